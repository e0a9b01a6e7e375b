import numpy as np
import pytest
import torch
from monai.networks.nets import UNet

from jobs.model import build_network, dp_incompatibilities, initial_weights, state_to_numpy
from jobs.spec import ModelSpec


@pytest.mark.parametrize(
    "spec",
    [
        ModelSpec(channels=(4, 8), strides=(2,), roi_size=(16, 16, 16)),
        ModelSpec(channels=(4, 8, 16), strides=(2, 2), roi_size=(16, 16, 16), num_res_units=0),
        ModelSpec(network="segresnet", channels=(4, 8), strides=(2,), roi_size=(16, 16, 16)),
    ],
    ids=["unet", "unet-no-residual", "segresnet"],
)
def test_networks_map_a_volume_to_same_sized_logits(spec):
    network = build_network(spec)
    out = network(torch.zeros(2, 1, *spec.roi_size))
    assert out.shape == (2, 1, *spec.roi_size)
    assert dp_incompatibilities(network) == []


def test_same_seed_same_weights_and_server_site_agree():
    spec = ModelSpec(channels=(4, 8), strides=(2,), roi_size=(16, 16, 16))
    first, second = initial_weights(spec, 3), initial_weights(spec, 3)
    assert all(np.array_equal(first[k], second[k]) for k in first)
    other = initial_weights(spec, 4)
    assert any(not np.array_equal(first[k], other[k]) for k in first)
    # A site's freshly built network accepts the server's weights key for key.
    build_network(spec).load_state_dict({k: torch.from_numpy(v) for k, v in first.items()})


def test_batchnorm_is_reported_with_its_submodule_path():
    problems = dp_incompatibilities(UNet(3, 1, 1, (4, 8), (2,), norm="batch"))
    assert problems
    assert all("BatchNorm3d is not supported with DP" in p for p in problems)
    assert any(p.startswith("model.model.0.") for p in problems)


def test_only_a_leading_opacus_prefix_is_stripped():
    state = {"_module.a._module.b": torch.zeros(1), "c": torch.ones(1)}
    assert set(state_to_numpy(state)) == {"a._module.b", "c"}
