"""Local training and validation steps at a site (pure torch/MONAI; no FLARE, no file I/O).

Also where a site's tensors live: the device (CPU, or the one GPU that simulated sites share)
and the memory layout, chosen by a pure function from what the machine offers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.losses import DiceLoss
from torch import nn

from jobs.spec import LrSchedule, Optimizer, TrainingSpec

__all__ = [
    "SITES_SHARING_DEVICE_ENV",
    "DevicePlacement",
    "OnDevice",
    "RoundStats",
    "apply_placement",
    "average_crop_gradients",
    "device_placement",
    "make_loss",
    "round_learning_rates",
    "scheduled_lr",
    "sites_sharing_device",
    "train_epochs",
    "use_cpu_threads",
]

SITES_SHARING_DEVICE_ENV = "FEDSEG_SITES_SHARING_DEVICE"
"""How many site processes run at once on this machine's accelerator (set by fedseg's
simulator for its site processes; unset = 1, a site that has the machine to itself)."""


@dataclass(frozen=True)
class DevicePlacement:
    """Where one site process trains."""

    device: str
    """Torch device name: cpu or cuda:0."""
    memory_fraction: float | None
    """Share of the GPU's memory this process may allocate (None on CPU)."""
    channels_last: bool
    """Store 5-D weights and batches as channels_last_3d (on CPU the demo UNet's DP step is 1.7x
    and its no-DP step 2.3x faster: docs/performance.md; not measured on GPU, so off there)."""


def device_placement(*, cuda_available: bool, sites_sharing: int) -> DevicePlacement:
    """Every site on the one GPU when there is one, each bounded to an equal share of its memory.

    ``sites_sharing``: site processes running at once on this machine (>= 1).
    """
    if sites_sharing < 1:
        raise ValueError(f"sites_sharing must be at least 1, got {sites_sharing}")
    if not cuda_available:
        return DevicePlacement(device="cpu", memory_fraction=None, channels_last=True)
    return DevicePlacement(
        device="cuda:0", memory_fraction=1.0 / sites_sharing, channels_last=False
    )


def sites_sharing_device(environ: Mapping[str, str] = os.environ) -> int:
    """Site processes sharing this machine's accelerator, from ``SITES_SHARING_DEVICE_ENV``."""
    text = environ.get(SITES_SHARING_DEVICE_ENV, "1")
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(
            f"environment variable {SITES_SHARING_DEVICE_ENV}={text!r}: expected a whole number "
            "of site processes >= 1; unset it, or set it to how many sites share this GPU"
        )
    return value


def use_cpu_threads(count: int | None = None) -> int:
    """Set torch's intra-op CPU threads for this process, the one place fedseg does; returns it.

    ``count`` None or 0 means every core. A seeded CPU run repeats only with the same count
    (torch's float reductions split by thread), so simulation passes a fixed share.
    """
    threads = count or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def apply_placement(placement: DevicePlacement, *, deterministic: bool = False) -> torch.device:
    """Bound this process's share of the GPU (no-op on CPU); returns the torch device.

    ``deterministic`` (simulation) asks cuDNN for its deterministic kernels, so a seeded run
    repeats on the same GPU; CPU kernels are deterministic for a fixed thread count already.
    """
    device = torch.device(placement.device)
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(placement.memory_fraction or 1.0, device)
        if deterministic:
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
    return device


def _memory_format(model: nn.Module) -> torch.memory_format:
    """channels_last_3d when the model's 5-D weights are stored that way, else contiguous."""
    for parameter in model.parameters():
        if parameter.dim() == 5:
            if parameter.is_contiguous(memory_format=torch.channels_last_3d):
                return torch.channels_last_3d
            break
    return torch.contiguous_format


class OnDevice(nn.Module):
    """Runs ``model`` on its own device for inputs that live elsewhere (e.g. MONAI's sliding
    window on CPU volumes); outputs come back to the input's device."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        parameter = next(self.model.parameters())
        moved = image.to(parameter.device, memory_format=_memory_format(self.model))
        return self.model(moved).to(image.device)


@dataclass(frozen=True)
class RoundStats:
    steps: int
    mean_loss: float
    """Mean training loss over non-empty steps (nan when every Poisson batch was empty)."""


class LesionLoss(nn.Module):
    """Soft Dice (smoothed by 1 voxel) + binary cross-entropy with lesion voxels up-weighted.

    Input logits and target (B, 1, H, W, D). Both terms are per sample and averaged over the
    batch, so each patient's gradient depends on that patient alone, as per-sample clipping
    requires (batch-level Dice would couple patients). Dice alone collapses to "no lesion
    anywhere": once sigmoids saturate its gradient vanishes; the weighted BCE term keeps a
    gradient on lesion voxels (measured on the simulated sites, 800 steps: Dice alone 0.0-0.3,
    with BCE x5 up to 0.58 validation Dice).
    """

    def __init__(self, *, lesion_weight: float = 5.0, reduction: str = "mean") -> None:
        super().__init__()
        self.dice = DiceLoss(
            sigmoid=True, batch=False, smooth_nr=1.0, smooth_dr=1.0, reduction="none"
        )
        self.register_buffer("lesion_weight", torch.tensor(lesion_weight))
        # "none" gives one loss per sample, (B,): Opacus's ghost clipping sets it while it runs.
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        bce = nn.functional.binary_cross_entropy_with_logits(
            logits, target, pos_weight=self.lesion_weight, reduction="none"
        )
        per_sample = self.dice(logits, target).flatten(1).mean(1) + bce.flatten(1).mean(1)
        if self.reduction == "none":
            return per_sample
        if self.reduction == "sum":
            return per_sample.sum()
        return per_sample.mean()


def make_loss() -> nn.Module:
    return LesionLoss()


def make_optimizer(
    training: TrainingSpec, parameters: Iterable[nn.Parameter]
) -> torch.optim.Optimizer:
    """The spec's optimizer at its base lr (``round_learning_rates`` sets each epoch's rate)."""
    if training.optimizer == Optimizer.ADAM:
        return torch.optim.Adam(parameters, lr=training.lr)
    return torch.optim.SGD(parameters, lr=training.lr, momentum=training.momentum)


def average_crop_gradients(optimizer: torch.optim.Optimizer, crops: int) -> None:
    """Turn per-crop gradients into per-patient ones: every parameter's ``grad_sample``
    (B*K, *shape), crops of one patient adjacent, becomes their mean (B, *shape).

    Opacus then clips each row, so what one patient adds to a step is bounded by the clip norm
    whatever K is (augmentation multiplicity: less variance per patient at the same privacy).
    A no-op without per-sample gradients (no DP).
    """
    for group in optimizer.param_groups:
        for param in group["params"]:
            samples = getattr(param, "grad_sample", None)
            if samples is None:
                continue
            if samples.shape[0] % crops:
                raise ValueError(
                    f"average_crop_gradients: {samples.shape[0]} per-sample gradients are not "
                    f"whole patients of {crops} crops"
                )
            param.grad_sample = samples.reshape(-1, crops, *samples.shape[1:]).mean(dim=1)


def _noise_only_step(optimizer: torch.optim.Optimizer) -> None:
    """An Opacus step for an empty Poisson batch: no gradient, but noise is still added.

    Skipping the step instead would make "no update" reveal that nobody was sampled, which the
    privacy accounting (Gaussian noise on every step) does not allow.
    """
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.requires_grad:
                param.grad_sample = param.new_zeros((0, *param.shape))
    optimizer.step()


def scheduled_lr(base_lr: float, schedule: LrSchedule, *, epoch: int, total_epochs: int) -> float:
    """Learning rate for epoch ``epoch`` (0-based) of a job of ``total_epochs`` epochs.

    ``constant`` keeps ``base_lr``; ``cosine`` is ``base_lr * (1 + cos(pi * epoch / total)) / 2``:
    ``base_lr`` at the first epoch, falling towards 0 (never reaching it) at the last.
    """
    if total_epochs < 1 or not 0 <= epoch < total_epochs:
        raise ValueError(f"scheduled_lr: epoch {epoch} is outside 0..{total_epochs - 1}")
    if schedule == LrSchedule.CONSTANT:
        return base_lr
    if schedule == LrSchedule.COSINE:
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / total_epochs))
    raise ValueError(f"scheduled_lr: unknown schedule {schedule!r} (constant | cosine)")


def round_learning_rates(training: TrainingSpec, round_index: int) -> list[float]:
    """The learning rate of each of round ``round_index``'s ``local_epochs`` passes.

    Every trainer of a job (each site, local-only, pooled) runs the same schedule over the
    same ``rounds x local_epochs`` epochs, so the rows of a comparison share it too.
    """
    total = training.rounds * training.local_epochs
    first = round_index * training.local_epochs
    return [
        scheduled_lr(
            training.lr, training.lr_schedule, epoch=min(first + e, total - 1), total_epochs=total
        )
        for e in range(training.local_epochs)
    ]


def train_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    *,
    epochs: int,
    loss_fn: nn.Module,
    lr_per_epoch: Sequence[float] | None = None,
) -> RoundStats:
    """Run ``epochs`` passes of ``loader``; each batch is (image, label), both (B, 1, *roi), or
    (B, K, 1, *roi) with K crops per patient (``training.crops_per_patient``).

    K crops are one network batch of B*K; under DP each patient's K per-crop gradients are then
    averaged into one (``average_crop_gradients``) before Opacus clips it, so the patient stays
    the unit. Batches are moved to the model's device and memory format. ``lr_per_epoch`` (one
    learning rate per pass) is set on every parameter group before its pass; None keeps the
    optimizer's.
    """
    if lr_per_epoch is not None and len(lr_per_epoch) != epochs:
        raise ValueError(f"train_epochs: {len(lr_per_epoch)} learning rates for {epochs} epochs")
    model.train()
    losses: list[float] = []
    steps = 0
    device = next(model.parameters()).device
    layout = _memory_format(model)
    for epoch in range(epochs):
        if lr_per_epoch is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_per_epoch[epoch]
        for image, label in loader:
            crops = 1
            if image.dim() == 6:  # (B, K, 1, *roi): K crops of each patient
                crops = image.shape[1]
                image, label = image.flatten(0, 1), label.flatten(0, 1)
            image = image.to(device, memory_format=layout, non_blocking=True)
            label = label.to(device, memory_format=layout, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            if image.shape[0] == 0:
                _noise_only_step(optimizer)
            else:
                loss = loss_fn(model(image), label)
                loss.backward()
                if crops > 1:
                    average_crop_gradients(optimizer, crops)
                optimizer.step()
                losses.append(float(loss.detach()))
            steps += 1
    optimizer.zero_grad(set_to_none=True)
    return RoundStats(steps=steps, mean_loss=float(np.mean(losses)) if losses else math.nan)
