"""Where a site trains: the one GPU shared by every simulated site, or the CPU (pure choice)."""

import pytest
import torch

from jobs.model import build_network, initial_weights, numpy_to_state
from site_app.training import (
    SITES_SHARING_DEVICE_ENV,
    DevicePlacement,
    OnDevice,
    apply_placement,
    device_placement,
    sites_sharing_device,
)
from tests.conftest import site_job, tiny_spec


@pytest.mark.parametrize(
    "cuda, sites, expected",
    [
        (False, 1, DevicePlacement("cpu", None, channels_last=True)),
        (False, 20, DevicePlacement("cpu", None, channels_last=True)),
        (True, 1, DevicePlacement("cuda:0", 1.0, channels_last=False)),
        (True, 4, DevicePlacement("cuda:0", 0.25, channels_last=False)),
    ],
)
def test_sites_share_the_one_gpu_in_equal_parts(cuda, sites, expected):
    assert device_placement(cuda_available=cuda, sites_sharing=sites) == expected


def test_no_sites_is_an_error():
    with pytest.raises(ValueError, match="at least 1"):
        device_placement(cuda_available=True, sites_sharing=0)


@pytest.mark.parametrize("environ, expected", [({}, 1), ({SITES_SHARING_DEVICE_ENV: "3"}, 3)])
def test_sites_sharing_comes_from_the_simulator_environment(environ, expected):
    assert sites_sharing_device(environ) == expected


@pytest.mark.parametrize("text", ["0", "-2", "two", ""])
def test_a_bad_sharing_count_names_the_variable_and_the_fix(text):
    with pytest.raises(ValueError, match=rf"{SITES_SHARING_DEVICE_ENV}=.*unset it"):
        sites_sharing_device({SITES_SHARING_DEVICE_ENV: text})


def test_cpu_placement_touches_no_gpu_setting():
    placement = device_placement(cuda_available=False, sites_sharing=2)
    assert apply_placement(placement, deterministic=True) == torch.device("cpu")


def test_on_device_runs_a_channels_last_model_on_contiguous_windows():
    torch.manual_seed(0)
    model = build_network(tiny_spec().model).eval()
    channels_last = build_network(tiny_spec().model).eval()
    channels_last.load_state_dict(model.state_dict())
    channels_last = channels_last.to(memory_format=torch.channels_last_3d)
    window = torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        expected = model(window)
        got = OnDevice(channels_last)(window)
    assert got.device == window.device and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_a_cpu_site_keeps_channels_last_weights_and_returns_plain_arrays(tiny_federation, tmp_path):
    job = site_job(tiny_spec(), tiny_federation / "site-1", tmp_path)
    assert job.device == torch.device("cpu")
    kernels = [p for p in job.network.parameters() if p.dim() == 5]
    assert kernels and all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in kernels)
    weights, _ = job.train_round(initial_weights(job.spec.model, 0), 0)
    assert all(array.flags["C_CONTIGUOUS"] for array in weights.values())
    # What leaves the site loads into a freshly built (contiguous) network.
    build_network(job.spec.model).load_state_dict(numpy_to_state(weights))
