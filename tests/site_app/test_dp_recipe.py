"""The DP fine-tuning levers: a trainable subset (frozen parameters get no noise and are not
sent changed) and several crops per patient (averaged before the one per-patient clip)."""

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from jobs.model import build_network, freeze_untrainable, initial_weights, trainable_names
from site_app.dp_samplers import wrap_private
from site_app.training import average_crop_gradients, make_loss
from tests.conftest import site_job, tiny_spec

CLIP = 0.01


def _private(network, mode: str):
    loader = DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=2)
    model, optimizer, _ = wrap_private(
        PrivacyEngine(),
        module=network,
        optimizer=torch.optim.SGD([p for p in network.parameters() if p.requires_grad], lr=0.1),
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=CLIP,  # small: every patient's gradient is clipped
        grad_sample_mode=mode,
    )
    return model, optimizer


def _summed_clipped_gradient(patients: list[torch.Tensor], labels, *, mode: str) -> torch.Tensor:
    """What one DP step adds up before noise: each patient's K crops (K, 1, *roi) averaged into
    one gradient, clipped to CLIP, summed over patients (Opacus's own clipping)."""
    torch.manual_seed(0)
    network = build_network(tiny_spec().model)
    model, optimizer = _private(network, mode)
    crops = patients[0].shape[0]
    image = torch.cat(patients)  # (B*K, 1, *roi), each patient's crops adjacent
    optimizer.zero_grad()
    make_loss()(model(image), torch.cat(labels)).backward()
    average_crop_gradients(optimizer, crops)
    assert optimizer.params[0].grad_sample.shape[0] == len(patients)  # one row per patient
    optimizer.clip_and_accumulate()
    return torch.cat([p.summed_grad.flatten() for p in optimizer.params])


@pytest.mark.parametrize("mode", ["grouped", "functorch", "hooks"])
def test_one_patient_adds_at_most_the_clip_norm_whatever_the_number_of_crops(mode):
    generator = torch.Generator().manual_seed(3)

    def patient(k: int):
        image = torch.rand(k, 1, 16, 16, 16, generator=generator)
        return image, (image > 0.8).float()

    for crops in (1, 4):
        others = [patient(crops) for _ in range(2)]
        extra = patient(crops)
        without = _summed_clipped_gradient(
            [p[0] for p in others], [p[1] for p in others], mode=mode
        )
        with_extra = _summed_clipped_gradient(
            [p[0] for p in [*others, extra]], [p[1] for p in [*others, extra]], mode=mode
        )
        difference = float(torch.linalg.vector_norm(with_extra - without))
        assert 0 < difference <= CLIP * (1 + 1e-4), (crops, difference)


def test_averaging_crops_is_the_gradient_of_the_patient_s_mean_crop_loss():
    torch.manual_seed(0)
    network = build_network(tiny_spec().model)
    model, optimizer = _private(network, "grouped")
    generator = torch.Generator().manual_seed(5)
    crops = torch.rand(3, 1, 16, 16, 16, generator=generator)
    labels = (crops > 0.8).float()
    optimizer.zero_grad()
    make_loss()(model(crops), labels).backward()
    average_crop_gradients(optimizer, 3)
    per_patient = torch.cat([p.grad_sample.flatten() for p in optimizer.params])
    # The same patient's gradient computed directly, without Opacus.
    reference = build_network(tiny_spec().model)
    reference.load_state_dict(
        {k.removeprefix("_module."): v for k, v in model.state_dict().items()}
    )
    loss = make_loss()(reference(crops), labels)
    loss.backward()
    direct = torch.cat([p.grad.flatten() for p in reference.parameters()])
    assert torch.allclose(per_patient, direct, rtol=1e-4, atol=1e-7)


def test_patterns_choose_the_trainable_parameters():
    network = build_network(tiny_spec().model)
    names = [name for name, _ in network.named_parameters()]
    assert trainable_names(network, ["*"]) == names
    biases = trainable_names(network, ["*.bias"])
    assert biases and all(name.endswith(".bias") for name in biases)
    count = freeze_untrainable(network, ["*.bias"])
    assert count == sum(p.numel() for n, p in network.named_parameters() if n in biases)
    assert [n for n, p in network.named_parameters() if p.requires_grad] == biases


def test_frozen_parameters_are_returned_exactly_as_received(tiny_federation, tmp_path):
    """Under DP a frozen parameter gets no gradient and no noise: the site sends back the very
    values it received, and the noise it adds is sized for the trainable ones only."""
    spec = tiny_spec(training={"trainable": ["*.bias"], "crops_per_patient": 2})
    job = site_job(spec, tiny_federation / "site-1", tmp_path)
    start = initial_weights(spec.model, 0)
    weights, meta = job.train_round(start, 0)
    for name, value in weights.items():
        if name.endswith(".bias"):
            continue
        assert np.array_equal(value, start[name]), name
    assert any(not np.array_equal(weights[n], start[n]) for n in start if n.endswith(".bias"))
    biases = sum(v.size for n, v in start.items() if n.endswith(".bias"))
    assert job.trainable_scalars == biases
    noised = [p for group in job.optimizer.param_groups for p in group["params"]]
    assert sum(p.numel() for p in noised) == biases
    assert meta["num_steps"] > 0
