"""Segmentation metrics at a site: MONAI's Dice and 95th-percentile Hausdorff distance in mm.

Pure functions over binary masks (``volume_scores``, ``summarize``) plus one inference edge
(``evaluate_patients``). What leaves the site is only ``summarize``'s counts and means.

Definitions (per volume; prediction = sigmoid > 0.5, both masks (H, W, D) at the job's
``data.target_spacing_mm``, which is therefore the spacing HD95 is measured with):

- **Dice** — MONAI ``DiceMetric`` with ``ignore_empty``: a volume whose truth has no lesion has no
  Dice (it is left out, so predicting nothing cannot score on healthy patients); an empty
  prediction on a lesion scores 0.
- **HD95** — MONAI ``HausdorffDistanceMetric(percentile=95)``, symmetric, Euclidean, in mm. It is
  undefined when either mask is empty (MONAI 1.6 returns nan and warns). Such volumes are never
  averaged in as 0 or inf: a lesion volume with an empty prediction is counted in
  ``hd95_missing`` instead, and a lesion-free volume is left out like its Dice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from torch import nn

from jobs.messages import SiteResultMeta

__all__ = [
    "PatientEvaluation",
    "VolumeScore",
    "evaluate_patients",
    "patient_dice",
    "patient_hd95",
    "summarize",
    "volume_scores",
]

HD95_PERCENTILE = 95.0
THRESHOLD = 0.5
"""Sigmoid probability above which a voxel is predicted lesion."""


@dataclass(frozen=True)
class VolumeScore:
    """Metrics of one volume. ``dice`` None = no lesion in the truth (volume not scored);
    ``hd95_mm`` None = undefined (see ``empty_prediction``)."""

    dice: float | None
    hd95_mm: float | None
    has_lesion: bool
    empty_prediction: bool
    """True when the truth has a lesion and the prediction is empty: Dice 0, HD95 undefined."""


def _as_batch(mask: np.ndarray | torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    return (tensor > 0).float()[None, None]  # (1, 1, H, W, D): one volume, one (lesion) channel


def volume_scores(
    prediction: np.ndarray | torch.Tensor,
    truth: np.ndarray | torch.Tensor,
    *,
    spacing_mm: Sequence[float],
) -> VolumeScore:
    """Dice and HD95 of one binary prediction against its truth.

    Args:
        prediction: (H, W, D) mask, non-zero = lesion.
        truth: (H, W, D) mask of the same shape, non-zero = lesion.
        spacing_mm: voxel size (H, W, D) in mm; HD95 is in mm.

    Raises:
        ValueError: the shapes differ or the spacing does not have one positive value per axis.
    """
    pred, true = _as_batch(prediction), _as_batch(truth)
    if pred.shape != true.shape or pred.ndim != 5:
        raise ValueError(
            f"volume_scores: prediction {tuple(prediction.shape)} and truth "
            f"{tuple(truth.shape)} must be two 3D masks of the same shape"
        )
    spacing = [float(s) for s in spacing_mm]
    if len(spacing) != 3 or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise ValueError(f"volume_scores: spacing_mm must be 3 positive numbers, got {spacing}")
    has_lesion = bool(true.any())
    if not has_lesion:
        return VolumeScore(dice=None, hd95_mm=None, has_lesion=False, empty_prediction=False)
    dice_metric = DiceMetric(include_background=True, reduction="none", ignore_empty=True)
    dice = float(dice_metric(y_pred=pred, y=true)[0, 0])
    if not bool(pred.any()):
        return VolumeScore(dice=dice, hd95_mm=None, has_lesion=True, empty_prediction=True)
    # include_background=True: our single channel *is* the lesion, not a background channel.
    hd_metric = HausdorffDistanceMetric(
        include_background=True, percentile=HD95_PERCENTILE, reduction="none"
    )
    hd95 = float(hd_metric(y_pred=pred, y=true, spacing=spacing)[0, 0])
    return VolumeScore(dice=dice, hd95_mm=hd95, has_lesion=True, empty_prediction=False)


@dataclass(frozen=True)
class PatientEvaluation:
    """One held-out patient's volume scores. ``patient_key`` never leaves the site."""

    patient_key: str
    volumes: tuple[VolumeScore, ...]


def patient_dice(patient: PatientEvaluation) -> float | None:
    """Mean Dice over the patient's lesion volumes; None when none has a lesion."""
    values = [v.dice for v in patient.volumes if v.dice is not None]
    return float(np.mean(values)) if values else None


def patient_hd95(patient: PatientEvaluation) -> float | None:
    """Mean HD95 (mm) over the patient's volumes where it is defined; None when nowhere."""
    values = [v.hd95_mm for v in patient.volumes if v.hd95_mm is not None]
    return float(np.mean(values)) if values else None


def summarize(patients: Sequence[PatientEvaluation]) -> SiteResultMeta:
    """The site-level metrics as task metadata (its ``val_*`` fields; counts and means only).

    Dice and HD95 are means over volumes (lesion volumes for Dice; volumes where HD95 is
    defined for HD95); either is None when there is nothing to average.
    """
    volumes = [v for p in patients for v in p.volumes]
    dice = [v.dice for v in volumes if v.dice is not None]
    hd95 = [v.hd95_mm for v in volumes if v.hd95_mm is not None]
    return SiteResultMeta(
        val_dice=float(np.mean(dice)) if dice else None,
        val_hd95_mm=float(np.mean(hd95)) if hd95 else None,
        val_hd95_missing=sum(v.empty_prediction for v in volumes),
        val_lesion_volumes=sum(v.has_lesion for v in volumes),
        val_patients=len(patients),
    )


@torch.no_grad()
def evaluate_patients(
    model: nn.Module,
    patients: Sequence,
    *,
    roi_size: tuple[int, int, int],
    spacing_mm: Sequence[float],
) -> list[PatientEvaluation]:
    """Run ``model`` over every volume of ``patients`` (``PreparedPatient``) and score it.

    Each volume's image is (1, H, W, D) in [0, 1] at ``spacing_mm``; inference is MONAI's
    sliding window with ``roi_size`` windows; the label is (1, H, W, D).
    """
    model.eval()
    evaluations = []
    for patient in patients:
        scores = []
        for volume in patient.volumes:
            image = torch.from_numpy(volume.image)[None]
            logits = sliding_window_inference(
                image, roi_size=roi_size, sw_batch_size=4, predictor=model, overlap=0.25
            )
            prediction = (torch.sigmoid(logits) > THRESHOLD)[0, 0]
            scores.append(volume_scores(prediction, volume.label[0], spacing_mm=spacing_mm))
        evaluations.append(PatientEvaluation(patient.patient_key, tuple(scores)))
    return evaluations
