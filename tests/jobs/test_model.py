import numpy as np
import pytest
import torch
from monai.networks.nets import UNet

from jobs.model import build_network, dp_incompatibilities, initial_weights, state_to_numpy
from jobs.spec import JobSpecError, ModelSpec
from tests.conftest import tiny_spec


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


# -- model.init: the weights a job starts from, checked against their sha256 ---------------------


def _saved_weights(tmp_path, spec, seed=3):
    from jobs.model import file_sha256, numpy_to_state

    path = tmp_path / "public.pt"
    torch.save(numpy_to_state(initial_weights(spec.model, seed)), path)
    return path, file_sha256(path)


def test_init_weights_load_when_their_hash_matches(tmp_path):
    spec = tiny_spec()
    path, digest = _saved_weights(tmp_path, spec)
    with_init = tiny_spec(model={"init": {"file": path.name, "sha256": digest}})
    loaded = initial_weights(with_init.model, 0, model_store=tmp_path)
    expected = initial_weights(spec.model, 3)
    assert all(np.array_equal(loaded[k], expected[k]) for k in expected)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("hash", "model.init.sha256: .* has sha256 .*, the spec says 0{64}; refusing"),
        ("missing", "model.init.file: .*other.pt not found"),
        ("store", "needs a model store"),
        ("network", "does not hold this network's weights"),
    ],
)
def test_init_weights_are_refused_naming_the_problem(tmp_path, change, message):
    from jobs.model import ModelInitError

    spec = tiny_spec()
    path, digest = _saved_weights(tmp_path, spec)
    init = {"file": path.name, "sha256": digest}
    model = {}
    if change == "hash":
        init["sha256"] = "0" * 64
    if change == "missing":
        init["file"] = "other.pt"
    if change == "network":
        model = {"channels": [4, 8, 16], "strides": [2, 2]}
    with_init = tiny_spec(model={**model, "init": init})
    with pytest.raises(ModelInitError, match=message):
        initial_weights(with_init.model, 0, model_store=None if change == "store" else tmp_path)


@pytest.mark.parametrize(
    "name", ["../escape.pt", "/etc/passwd", "a/b.pt", "x{$HOME}.pt", ".hidden"]
)
def test_init_file_is_a_plain_name_in_the_model_store(name):
    with pytest.raises(JobSpecError, match=r"model\.init\.file"):
        tiny_spec(model={"init": {"file": name, "sha256": "0" * 64}})


def test_a_model_mixing_batchnorm_and_another_unsupported_layer_reports_both():
    """BatchNorm is named by its path; whatever else Opacus finds (here an LSTM, which needs
    Opacus's DPLSTM) is kept in Opacus's words, not hidden behind the BatchNorm lines."""
    from torch import nn

    model = nn.Sequential(
        nn.Conv3d(1, 2, 3),
        nn.Sequential(nn.InstanceNorm3d(2, affine=True), nn.BatchNorm3d(2)),
        nn.LSTM(4, 4),
        nn.BatchNorm1d(4),
    )
    problems = dp_incompatibilities(model)

    assert [p for p in problems if "BatchNorm" in p and "not supported with DP" in p] == [
        "model.1.1: BatchNorm3d is not supported with DP (it mixes patients within a batch); "
        "use norm: instance",
        "model.3: BatchNorm1d is not supported with DP (it mixes patients within a batch); "
        "use norm: instance",
    ]
    assert len(problems) == 3
    assert problems[2].startswith("model: ") and "nn.LSTM" in problems[2]
    assert dp_incompatibilities(nn.Sequential(nn.Conv3d(1, 2, 3), nn.InstanceNorm3d(2))) == []
