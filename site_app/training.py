"""Local training and validation steps at a site (pure torch/MONAI; no FLARE, no file I/O)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceLoss
from monai.metrics import DiceMetric
from torch import nn

from site_app.dataset import PreparedPatient

__all__ = ["RoundStats", "dice_on_patients", "make_loss", "train_epochs"]


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


def train_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    *,
    epochs: int,
    loss_fn: nn.Module,
) -> RoundStats:
    """Run ``epochs`` passes of ``loader``; each batch is (image, label), both (B, 1, *roi)."""
    model.train()
    losses: list[float] = []
    steps = 0
    for _ in range(epochs):
        for image, label in loader:
            optimizer.zero_grad(set_to_none=True)
            if image.shape[0] == 0:
                _noise_only_step(optimizer)
            else:
                loss = loss_fn(model(image), label)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
            steps += 1
    optimizer.zero_grad(set_to_none=True)
    return RoundStats(steps=steps, mean_loss=float(np.mean(losses)) if losses else math.nan)


@torch.no_grad()
def dice_on_patients(
    model: nn.Module,
    patients: Sequence[PreparedPatient],
    *,
    roi_size: tuple[int, int, int],
) -> float | None:
    """Mean lesion Dice over the validation volumes that contain a lesion (threshold 0.5).

    Volumes without lesion are left out (MONAI's ``ignore_empty``), so a model that predicts
    nothing scores 0, not the share of lesion-free patients. None when no held-out volume has a
    lesion.
    """
    volumes = [volume for patient in patients for volume in patient.volumes]
    if not volumes:
        return None
    model.eval()
    metric = DiceMetric(include_background=True, reduction="mean", ignore_empty=True)
    for volume in volumes:
        image = torch.from_numpy(volume.image)[None]
        label = torch.from_numpy(volume.label)[None]
        logits = sliding_window_inference(
            image, roi_size=roi_size, sw_batch_size=4, predictor=model, overlap=0.25
        )
        metric(y_pred=(torch.sigmoid(logits) > 0.5).float(), y=label)
    scores = metric.get_buffer()
    if scores is None or bool(torch.isnan(scores).all()):
        return None
    return float(torch.nanmean(scores).item())
