import numpy as np
import pytest

from server_app.aggregation import SiteUpdate, fed_avg, server_step


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


def test_a_server_step_of_one_without_momentum_is_plain_fedavg_bit_for_bit():
    old = {"w": np.array([0.1, 0.2], dtype=np.float32), "n": np.array([3])}
    averaged = {"w": np.array([0.3, -0.7], dtype=np.float32), "n": np.array([3])}
    weights, velocity = server_step(old, averaged, {}, lr=1.0, momentum=0.0)
    assert weights["w"].tobytes() == averaged["w"].tobytes() and velocity == {}


def test_the_server_step_scales_the_average_update_and_carries_momentum():
    old = {"w": np.array([1.0, 1.0], dtype=np.float32), "n": np.array([7])}
    averaged = {"w": np.array([2.0, 0.0], dtype=np.float32), "n": np.array([7])}
    first, velocity = server_step(old, averaged, {}, lr=2.0, momentum=0.5)
    np.testing.assert_allclose(first["w"], [3.0, -1.0])  # 1 + 2 * (+-1)
    assert first["w"].dtype == np.float32 and first["n"].tolist() == [7]
    # Next round the sites' average equals the current model: only momentum moves it.
    second, velocity = server_step(first, dict(first), velocity, lr=2.0, momentum=0.5)
    np.testing.assert_allclose(second["w"], [3.0 + 2 * 0.5 * 1.0, -1.0 - 2 * 0.5 * 1.0])
    np.testing.assert_allclose(velocity["w"], [0.5, -0.5])
