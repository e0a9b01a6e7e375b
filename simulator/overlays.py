"""Slice overlays of prediction vs ground truth, for synthetic data only.

One PNG per site: the middle lesion slice of one held-out simulated patient, CT with the truth
contour and each model's predicted contour. These pictures show pixel data, so they are drawn only
for folders written by ``fedseg simulate data`` (its manifest.json) and never in deployment code.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from monai.inferers import sliding_window_inference
from torch import nn

from simulator.cohort_manifest import MANIFEST_NAME
from site_app.dataset import PreparedPatient, PreparedVolume
from site_app.evaluation import THRESHOLD, volume_scores

__all__ = [
    "OverlayRefused",
    "held_out_lesion_volume",
    "middle_lesion_slice",
    "predict_mask",
    "require_simulator_data",
    "write_site_overlays",
]

log = logging.getLogger(__name__)

_SIMULATOR_GENERATOR = "fedseg.simulator"  # manifest["generator"] of simulator.cohort_manifest
_TRUTH_COLOUR = "lime"
_PREDICTION_COLOUR = "red"


class OverlayRefused(ValueError):
    """Overlays were asked for on data that is not the simulator's; the message says why."""


def require_simulator_data(data_dir: Path) -> None:
    """Raise ``OverlayRefused`` unless ``data_dir`` holds the simulator's manifest.json."""
    path = Path(data_dir) / MANIFEST_NAME
    refusal = (
        f"{data_dir}: slice overlays show pixel data and are drawn only for synthetic data "
        f"written by `fedseg simulate data` (its {MANIFEST_NAME}); "
    )
    if not path.is_file():
        raise OverlayRefused(refusal + f"{path} is missing, so none were drawn")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("generator") != _SIMULATOR_GENERATOR:
        raise OverlayRefused(refusal + f"{path} was not written by it, so none were drawn")


def middle_lesion_slice(label: np.ndarray) -> int:
    """Index along the last axis (slices) of the middle slice among those holding lesion.

    Args:
        label: (H, W, D) or (1, H, W, D) mask, non-zero = lesion.

    Raises:
        ValueError: the mask holds no lesion.
    """
    mask = np.asarray(label)
    mask = mask.reshape(mask.shape[-3:]) > 0
    slices = np.flatnonzero(mask.any(axis=(0, 1)))
    if slices.size == 0:
        raise ValueError("middle_lesion_slice: the label has no lesion voxel")
    return int(slices[slices.size // 2])


def held_out_lesion_volume(patients: Sequence[PreparedPatient]) -> PreparedVolume | None:
    """The held-out volume with the most lesion voxels (first on ties); None if none has one."""
    volumes = [volume for patient in patients for volume in patient.volumes]
    sizes = [int((volume.label > 0).sum()) for volume in volumes]
    if not volumes or max(sizes) == 0:
        return None
    return volumes[int(np.argmax(sizes))]


@torch.no_grad()
def predict_mask(
    model: nn.Module, image: np.ndarray, *, roi_size: tuple[int, int, int]
) -> np.ndarray:
    """Binary (H, W, D) prediction for one (1, H, W, D) image: sliding window, sigmoid > 0.5."""
    model.eval()
    logits = sliding_window_inference(
        torch.from_numpy(image)[None],
        roi_size=roi_size,
        sw_batch_size=4,
        predictor=model,
        overlap=0.25,
    )
    return (torch.sigmoid(logits) > THRESHOLD)[0, 0].numpy()


def _draw(
    *,
    title: str,
    volume: PreparedVolume,
    predictions: Mapping[str, np.ndarray],
    spacing_mm: Sequence[float],
    path: Path,
) -> Path:
    image, truth = volume.image[0], volume.label[0] > 0
    k = middle_lesion_slice(truth)
    # Pixels are drawn at their true aspect: rows x cols spacing in mm.
    aspect = float(spacing_mm[0]) / float(spacing_mm[1])
    figure = Figure(figsize=(3.2 * len(predictions), 3.8), dpi=100, layout="constrained")
    axes = figure.subplots(1, len(predictions), squeeze=False)
    for ax, (method, prediction) in zip(axes[0], predictions.items(), strict=True):
        ax.imshow(image[:, :, k], cmap="gray", vmin=0.0, vmax=1.0, aspect=aspect)
        ax.contour(truth[:, :, k], levels=[0.5], colors=_TRUTH_COLOUR, linewidths=1.2)
        if prediction[:, :, k].any():
            ax.contour(prediction[:, :, k], levels=[0.5], colors=_PREDICTION_COLOUR, linewidths=1.0)
        dice = volume_scores(prediction, truth, spacing_mm=spacing_mm).dice
        ax.set_title(f"{method}\nvolume Dice {dice:.2f}", fontsize=9)
        ax.set_axis_off()
    figure.suptitle(
        f"{title} — slice {k}: truth ({_TRUTH_COLOUR}) vs prediction ({_PREDICTION_COLOUR})",
        fontsize=9,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def write_site_overlays(
    *,
    data_dir: Path,
    val_patients: Mapping[str, Sequence[PreparedPatient]],
    models: Mapping[str, Callable[[str], nn.Module]],
    roi_size: tuple[int, int, int],
    spacing_mm: Sequence[float],
    out_dir: Path,
) -> list[Path]:
    """One PNG per site (``<out_dir>/<site>.png``), one panel per model.

    Args:
        data_dir: the simulated federation's folder; refused unless it is synthetic data.
        val_patients: each site's held-out patients (the federation's split).
        models: panel label -> function giving that model for a site (a local-only model
            differs per site, a federated one does not).
        roi_size: sliding-window size in voxels; spacing_mm: the volumes' voxel size (H, W, D).

    Raises:
        OverlayRefused: ``data_dir`` is not synthetic data written by ``fedseg simulate data``.
    """
    require_simulator_data(data_dir)
    written = []
    for site, patients in val_patients.items():
        volume = held_out_lesion_volume(patients)
        if volume is None:
            log.warning("%s: no held-out volume with a lesion; no overlay drawn", site)
            continue
        predictions = {
            label: predict_mask(model_for(site), volume.image, roi_size=roi_size)
            for label, model_for in models.items()
        }
        written.append(
            _draw(
                title=f"{site}, held-out synthetic patient",
                volume=volume,
                predictions=predictions,
                spacing_mm=spacing_mm,
                path=Path(out_dir) / f"{site}.png",
            )
        )
    return written
