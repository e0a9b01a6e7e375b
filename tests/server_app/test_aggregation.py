import numpy as np
import pytest

from server_app.aggregation import SiteUpdate, fed_avg


def _update(site, value, patients, shape=(2, 3)):
    return SiteUpdate(
        site=site, weights={"w": np.full(shape, value, np.float32)}, num_patients=patients
    )


def test_weights_by_patients():
    result = fed_avg([_update("site-1", 1.0, 1), _update("site-2", 4.0, 3)])
    np.testing.assert_allclose(result["w"], np.full((2, 3), (1.0 * 1 + 4.0 * 3) / 4))
    assert result["w"].dtype == np.float32


def test_equal_patients_is_plain_mean():
    result = fed_avg([_update("a", 2.0, 5), _update("b", 6.0, 5)])
    np.testing.assert_allclose(result["w"], 4.0)


def test_arrival_order_does_not_change_a_single_bit():
    rng = np.random.default_rng(0)
    updates = [
        SiteUpdate(f"site-{i}", {"w": rng.standard_normal(1000).astype(np.float32)}, i + 1)
        for i in range(5)
    ]
    forward = fed_avg(updates)["w"]
    backward = fed_avg(list(reversed(updates)))["w"]
    shuffled = fed_avg([updates[i] for i in (3, 0, 4, 2, 1)])["w"]
    assert forward.tobytes() == backward.tobytes() == shuffled.tobytes()


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        ([], "no site updates"),
        ([_update("site-1", 1.0, 0)], "site 'site-1' sent num_patients=0"),
        ([_update("a", 1.0, 1), _update("b", 1.0, 1, shape=(3, 2))], "site 'b' sent w with shape"),
        (
            [_update("a", 1.0, 1), SiteUpdate("b", {"v": np.zeros((2, 3))}, 1)],
            "site 'b' sent different parameters",
        ),
    ],
)
def test_bad_updates_are_refused_naming_the_site(updates, message):
    with pytest.raises(ValueError, match=message):
        fed_avg(updates)
