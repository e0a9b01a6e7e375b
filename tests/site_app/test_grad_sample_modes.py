"""fedseg's "grouped" per-sample gradients equal Opacus's own: per-patient clipping unchanged."""

import pytest
import torch
from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from jobs.model import build_network
from jobs.spec import PrivacySpec
from site_app.dp_samplers import GROUPED, wrap_private
from site_app.training import make_loss
from tests.conftest import tiny_spec


def _unet() -> nn.Module:
    # MONAI UNet: strided Conv3d, ConvTranspose3d, one shared PReLU slope, residual units.
    return build_network(tiny_spec().model)


def _odd_layers() -> nn.Module:
    """Layer settings the grouped formula must get right: channel-wise PReLU, conv groups,
    dilation, stride with padding, no bias, transposed conv with output_padding and groups."""
    return nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1),
        nn.PReLU(num_parameters=4),
        nn.Conv3d(4, 4, 3, stride=2, padding=2, dilation=2, groups=2, bias=False),
        nn.PReLU(),
        nn.ConvTranspose3d(4, 2, 3, stride=2, padding=1, output_padding=1, groups=2),
        nn.Conv3d(2, 1, 1),
    )


def _gradients(build, mode: str):
    """Per-sample gradients (B, P) and the clipped, averaged gradient (P,) of one batch."""
    torch.manual_seed(0)
    network = build()
    batch = 3
    loader = DataLoader(TensorDataset(torch.zeros(batch * 2, 1)), batch_size=batch)
    model, optimizer, _ = wrap_private(
        PrivacyEngine(),
        module=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.1),
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=0.001,  # small: every patient's gradient is clipped
        grad_sample_mode=mode,
    )
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(batch, 1, 16, 16, 16, generator=generator)
    label = (torch.rand(batch, 1, 16, 16, 16, generator=generator) > 0.9).float()
    optimizer.zero_grad()
    make_loss()(model(image), label).backward()
    per_sample = torch.cat([p.grad_sample.flatten(1) for p in optimizer.params], dim=1)
    optimizer.pre_step()  # clip per sample, sum, add (zero) noise, scale
    return model, per_sample, torch.cat([p.grad.flatten() for p in optimizer.params])


@pytest.mark.parametrize("build", [_unet, _odd_layers], ids=["monai-unet", "odd-layers"])
def test_grouped_per_sample_and_clipped_gradients_equal_opacus_hooks(build):
    _, reference_samples, reference = _gradients(build, "hooks")
    _, samples, clipped = _gradients(build, GROUPED)
    assert samples.shape == reference_samples.shape and samples.shape[0] == 3
    scale = reference_samples.abs().max()
    assert (samples - reference_samples).abs().max() <= 1e-5 * scale
    assert (clipped - reference).abs().max() <= 1e-5 * reference.abs().max()
    # Each patient's contribution was really clipped (the bound is below every norm).
    assert bool((reference_samples.norm(dim=1) > 0.001).all())


def test_grouped_samplers_are_used_by_that_model_only():
    model, _, _ = _gradients(_unet, GROUPED)
    sampler = model.GRAD_SAMPLERS[nn.Conv3d]
    for layer in (nn.ConvTranspose3d, nn.PReLU):
        assert model.GRAD_SAMPLERS[layer] is sampler
    # Opacus's own table (every other model in the process) is untouched.
    assert GradSampleModule.GRAD_SAMPLERS[nn.Conv3d] is not sampler
    assert nn.PReLU not in GradSampleModule.GRAD_SAMPLERS


def test_grouped_is_the_default_mode_of_a_job():
    assert PrivacySpec(noise_multiplier=1.0).grad_sample_mode.value == GROUPED
    assert tiny_spec(privacy={"grad_sample_mode": "grouped"}).privacy.grad_sample_mode == GROUPED
