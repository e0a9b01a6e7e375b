"""Local training and validation steps at a site (pure torch/MONAI; no FLARE, no file I/O)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from torch import nn

from site_app.dataset import PreparedPatient

__all__ = ["RoundStats", "dice_on_patients", "make_loss", "train_epochs"]


@dataclass(frozen=True)
class RoundStats:
    steps: int
    mean_loss: float
    """Mean training loss over non-empty steps (nan when every Poisson batch was empty)."""


def make_loss() -> nn.Module:
    # Dice computed per sample (batch=False) so each patient's loss, and so its per-sample
    # gradient, depends on that patient alone, as per-sample clipping requires.
    return DiceCELoss(sigmoid=True, batch=False)


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
    """Mean Dice over all validation volumes (sliding-window inference, threshold 0.5).

    A volume without lesion scores 1 when nothing is predicted and 0 otherwise, so false positives
    on lesion-free patients count. None when there is nothing to validate on.
    """
    volumes = [volume for patient in patients for volume in patient.volumes]
    if not volumes:
        return None
    model.eval()
    metric = DiceMetric(include_background=True, reduction="mean", ignore_empty=False)
    for volume in volumes:
        image = torch.from_numpy(volume.image)[None]
        label = torch.from_numpy(volume.label)[None]
        logits = sliding_window_inference(
            image, roi_size=roi_size, sw_batch_size=4, predictor=model, overlap=0.25
        )
        metric(y_pred=(torch.sigmoid(logits) > 0.5).float(), y=label)
    return float(metric.aggregate().item())
