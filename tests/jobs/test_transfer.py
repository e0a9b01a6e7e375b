"""Packed weights round-trip exactly in float32, within float16's precision in float16."""

import numpy as np
import pytest

from jobs.model import initial_weights
from jobs.spec import TransferDtype
from jobs.transfer import PACKED_PREFIX, pack_weights, unpack_weights, weight_layout
from tests.conftest import tiny_spec


@pytest.fixture(scope="module")
def weights():
    return initial_weights(tiny_spec().model, seed=0)


def test_float32_round_trip_is_exact_and_travels_as_one_array(weights):
    packed = pack_weights(weights, TransferDtype.FLOAT32)
    assert len(packed) == 1 and next(iter(packed)).startswith(PACKED_PREFIX)
    flat = next(iter(packed.values()))
    assert flat.dtype == np.float32 and flat.nbytes == sum(w.nbytes for w in weights.values())
    restored = unpack_weights(packed, weight_layout(tiny_spec().model))
    assert restored.keys() == weights.keys()
    for name, value in weights.items():
        assert restored[name].dtype == value.dtype and restored[name].shape == value.shape
        assert np.array_equal(restored[name], value)


def test_float16_halves_the_bytes_and_comes_back_as_float32(weights):
    packed = pack_weights(weights, TransferDtype.FLOAT16)
    flat = next(iter(packed.values()))
    assert flat.dtype == np.float16
    assert flat.nbytes * 2 == sum(w.nbytes for w in weights.values())
    restored = unpack_weights(packed, weight_layout(tiny_spec().model))
    for name, value in weights.items():
        assert restored[name].dtype == np.float32
        # float16 keeps 11 significant bits: relative error at most 2^-11 (normal range).
        np.testing.assert_allclose(restored[name], value, rtol=2**-11, atol=6.2e-5)
    assert any(not np.array_equal(restored[name], value) for name, value in weights.items())


def test_plain_named_weights_and_empty_results_pass_through(weights):
    layout = weight_layout(tiny_spec().model)
    assert unpack_weights(weights, layout) is weights
    assert pack_weights({}) == {} and unpack_weights({}, layout) == {}


@pytest.mark.parametrize(
    "other, message",
    [
        ({"channels": [4, 8, 16], "strides": [2, 2]}, "packed for another network"),
        ({"channels": [8, 16]}, "packed for another network"),
    ],
)
def test_weights_of_another_network_are_refused(weights, other, message):
    packed = pack_weights(weights)
    with pytest.raises(ValueError, match=message):
        unpack_weights(packed, weight_layout(tiny_spec(model=other).model))


def test_a_truncated_array_is_refused(weights):
    layout = weight_layout(tiny_spec().model)
    packed = {layout.key: next(iter(pack_weights(weights).values()))[:-1]}
    with pytest.raises(ValueError, match="packed weight values"):
        unpack_weights(packed, layout)


def test_float16_out_of_range_names_the_tensor_and_the_fix(weights):
    huge = dict(weights)
    name = sorted(huge)[0]
    huge[name] = huge[name] + 1e6
    with pytest.raises(ValueError, match=rf"{name}.*transfer_dtype: float32"):
        pack_weights(huge, TransferDtype.FLOAT16)
    assert pack_weights(huge, TransferDtype.FLOAT32)  # float32 carries it
