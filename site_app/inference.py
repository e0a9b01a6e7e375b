"""Apply a trained model at a site: each CT series of a folder gets one DICOM SEG of its lesions.

Series are found and validated as for training (the same header checks and quarantine reasons;
a series needs no label here). Each volume is resampled to the job's training spacing and
windowed exactly as `site_app.dataset.prepare_volume` does, segmented with MONAI's sliding window
as validation does, and the mask is resampled back (nearest) onto the series' own grid. Checking
the model's signed manifest is the caller's job and comes first (`fedseg site infer` does it with
`server_app.model_manifest` before calling anything here; site_app never imports server_app).
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import SpatialResample
from pydicom import Dataset, dcmread
from rich.console import Console
from torch import nn

from jobs.model import build_network
from jobs.progress import progress_bar
from jobs.spec import JobSpec
from site_app.ct_pixels import decode_hu_volume
from site_app.dataset import affine_tensor, preparation
from site_app.dicom_headers import SliceHeader, read_header
from site_app.dicom_series import (
    SeriesGeometry,
    SeriesProblem,
    group_by_series,
    series_folder,
    series_key,
)
from site_app.evaluation import THRESHOLD
from site_app.ingestion import (
    NoDicomFoundError,
    dicom_libraries_silenced,
    drop_images_without_pixels,
    require_data_dir,
    validate_series,
    walk_files,
)
from site_app.nifti_labels import is_nifti
from site_app.quarantine import (
    QuarantineEntry,
    QuarantineReason,
    describe_error,
    sorted_entries,
    write_quarantine,
)
from site_app.seg_writer import ModelProvenance, WrittenSeg, build_seg, write_seg

__all__ = [
    "InferenceError",
    "InferenceModel",
    "InferenceSummary",
    "SeriesScan",
    "find_series",
    "load_model",
    "predict_mask",
    "prepared_image",
    "run_inference",
    "seg_path",
]

logger = logging.getLogger(__name__)

QUARANTINE_NAME = "quarantine.json"
SEG_SUFFIX = ".seg.dcm"
SW_BATCH_SIZE = 4
SW_OVERLAP = 0.25
"""Sliding-window settings: those of validation (`site_app.evaluation.evaluate_patients`)."""


class InferenceError(Exception):
    """Inference cannot start (model, folders); the message says what to fix."""


# --- the model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class InferenceModel:
    """A network with the spec it was trained with and what its SEGs will say about it."""

    spec: JobSpec
    network: nn.Module
    provenance: ModelProvenance


def load_model(model_path: Path, *, spec: JobSpec, provenance: ModelProvenance) -> InferenceModel:
    """The spec's network with the weights of ``model_path``, read once and checked against
    ``provenance.model_sha256`` (the hash of the verified manifest), so the weights used are the
    ones that were verified even if the file changes meanwhile.

    Raises:
        InferenceError: the file differs from the manifest's hash, or does not hold this spec's
            network's weights.
    """
    model_path = Path(model_path)
    data = model_path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != provenance.model_sha256:
        raise InferenceError(
            f"{model_path}: sha256 {actual} is not the verified manifest's "
            f"{provenance.model_sha256}; the file changed after verification, run again"
        )
    try:
        state = torch.load(io.BytesIO(data), weights_only=True)  # tensors only: no code runs
        network = build_network(spec.model)
        network.load_state_dict(state)
    except (pickle.UnpicklingError, RuntimeError, EOFError, TypeError, AttributeError) as error:
        raise InferenceError(
            f"{model_path}: does not hold the weights of the network of job '{spec.name}' "
            f"({type(error).__name__}); give the model file saved with this job's manifest"
        ) from None
    return InferenceModel(spec=spec, network=network.eval(), provenance=provenance)


# --- finding series (the checks of training, without the need for a label) -----------------------


@dataclass(frozen=True)
class SeriesScan:
    """The valid CT series of a folder (by series key) and every file or series set aside."""

    series: tuple[SeriesGeometry, ...]
    quarantine: tuple[QuarantineEntry, ...]
    files_seen: int
    series_found: int


def find_series(data_dir: Path) -> SeriesScan:
    """Every CT series under ``data_dir`` that passes ingestion's checks, sorted by series key.

    Label files (DICOM SEG, NIfTI masks) are not inputs and are passed over; anything else that
    cannot be used is in ``quarantine`` with ingestion's reason.

    Raises:
        FileNotFoundError / NotADirectoryError / NoDicomFoundError: as `ingest_site`.
    """
    root = require_data_dir(Path(data_dir))
    files = [p for p in walk_files(root) if not is_nifti(p)]
    with dicom_libraries_silenced():
        reads = [read_header(path, root) for path in files]
    headers = [r for r in reads if isinstance(r, SliceHeader)]
    if not headers:
        raise NoDicomFoundError(
            f"no DICOM files in {root} ({len(files)} files looked at); point --data at the "
            "folder holding the DICOM export"
        )
    quarantine = [r for r in reads if isinstance(r, QuarantineEntry)]
    headers = drop_images_without_pixels(headers, quarantine)
    groups = group_by_series(h for h in headers if not h.is_segmentation)
    valid = []
    for uid, group in groups.items():
        entries, outcome = validate_series(uid, group)
        quarantine += entries
        if isinstance(outcome, SeriesGeometry):
            valid.append(outcome)
    valid.sort(key=lambda g: series_key(g.slices[0].series_uid))
    return SeriesScan(
        series=tuple(valid),
        quarantine=tuple(sorted_entries(quarantine)),
        files_seen=len(files),
        series_found=len(groups),
    )


# --- the prediction (pure, given the network) ---------------------------------------------------


def prepared_image(image_hu: np.ndarray, geometry: SeriesGeometry, spec: JobSpec) -> MetaTensor:
    """(1, H, W, D) in [0, 1] at ``spec.data.target_spacing_mm``, its affine (LPS mm) attached:
    the image `site_app.dataset.prepare_volume` gives training (`site_app.dataset.preparation`),
    from (rows, cols, slices) HU."""
    image = MetaTensor(image_hu[None].astype(np.float32), affine=affine_tensor(geometry))
    return preparation(spec.data)({"image": image})["image"]


def predict_mask(
    network: nn.Module,
    image_hu: np.ndarray,
    geometry: SeriesGeometry,
    spec: JobSpec,
    *,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """The lesion mask of one series on its own grid: uint8 (rows, cols, slices), 1 = lesion.

    ``image_hu`` is float32 (rows, cols, slices) in HU, slices in ``geometry.slices`` order. The
    network sees ``prepared_image``; windows of ``spec.model.roi_size`` run on ``device`` (the
    volume stays on the CPU); voxels with sigmoid > 0.5 are lesion, and that mask is resampled
    nearest-neighbour from the training grid back onto the series' grid by their affines.
    """
    image = prepared_image(image_hu, geometry, spec)
    with torch.inference_mode():
        logits = sliding_window_inference(
            image.as_tensor()[None],
            roi_size=spec.model.roi_size,
            sw_batch_size=SW_BATCH_SIZE,
            predictor=network,
            overlap=SW_OVERLAP,
            sw_device=device,
            device="cpu",
        )
        lesion = (torch.sigmoid(logits[0]) > THRESHOLD).float()
    on_training_grid = MetaTensor(lesion, affine=image.affine)
    back = SpatialResample(mode="nearest", padding_mode="zeros")(
        on_training_grid, dst_affine=affine_tensor(geometry), spatial_size=image_hu.shape
    )
    return np.ascontiguousarray(np.asarray(back[0]) > 0.5, dtype=np.uint8)


# --- the run over a folder -----------------------------------------------------------------------


@dataclass(frozen=True)
class InferenceSummary:
    """What one run did. ``written`` holds one SEG per series segmented; ``failed`` the series
    whose SEG could not be made from valid input, as (series key, what went wrong)."""

    written: tuple[WrittenSeg, ...]
    quarantine: tuple[QuarantineEntry, ...]
    failed: tuple[tuple[str, str], ...]
    files_seen: int
    series_found: int
    quarantine_path: Path


def seg_path(out_dir: Path, key: str) -> Path:
    """Where the SEG of series ``key`` goes: ``OUT/<series key>.seg.dcm``."""
    return Path(out_dir) / f"{key}{SEG_SUFFIX}"


def run_inference(
    data_dir: Path,
    out_dir: Path,
    model: InferenceModel,
    *,
    device: torch.device | str = "cpu",
    progress: bool = False,
    on_series: Callable[[int, int, WrittenSeg | QuarantineEntry | str], None] | None = None,
) -> InferenceSummary:
    """Segment every valid CT series under ``data_dir``; one SEG each in ``out_dir``.

    A series that cannot be used is quarantined with its reason (``OUT/quarantine.json``) and
    the others are still done. ``on_series(index, total, outcome)`` is told after each series
    (a `WrittenSeg`, a `QuarantineEntry`, or a failure's description).

    Raises:
        InferenceError: ``out_dir`` lies inside ``data_dir`` (which is only read).
        FileNotFoundError / NotADirectoryError / NoDicomFoundError: as `ingest_site`.
    """
    root, out_dir = Path(data_dir), Path(out_dir)
    if out_dir.resolve().is_relative_to(root.resolve()):
        raise InferenceError(
            f"--out {out_dir} lies inside the data folder {root}, which fedseg only reads (and "
            "a SEG there would be read as a training label); choose a folder outside it"
        )
    scan = find_series(root)
    quarantine = list(scan.quarantine)
    written: list[WrittenSeg] = []
    failed: list[tuple[str, str]] = []
    total = len(scan.series)
    with _series_bar(progress, total) as advance:
        for index, geometry in enumerate(scan.series, start=1):
            outcome = _segment_one(root, out_dir, geometry, model, device)
            if isinstance(outcome, WrittenSeg):
                written.append(outcome)
            elif isinstance(outcome, QuarantineEntry):
                quarantine.append(outcome)
            else:
                failed.append((series_key(geometry.slices[0].series_uid), outcome))
            if on_series is not None:
                on_series(index, total, outcome)
            advance()
    quarantine_path = out_dir / QUARANTINE_NAME
    write_quarantine(quarantine, quarantine_path)
    logger.info(
        "inference: %d series found, %d SEG(s) written, %d quarantine entries, %d failed",
        scan.series_found,
        len(written),
        len(quarantine),
        len(failed),
    )
    return InferenceSummary(
        written=tuple(written),
        quarantine=tuple(sorted_entries(quarantine)),
        failed=tuple(failed),
        files_seen=scan.files_seen,
        series_found=scan.series_found,
        quarantine_path=quarantine_path,
    )


def _segment_one(
    root: Path,
    out_dir: Path,
    geometry: SeriesGeometry,
    model: InferenceModel,
    device: torch.device | str,
) -> WrittenSeg | QuarantineEntry | str:
    key = series_key(geometry.slices[0].series_uid)
    with dicom_libraries_silenced():
        image = decode_hu_volume(root, geometry)
        sources = image if isinstance(image, SeriesProblem) else _source_datasets(root, geometry)
    if isinstance(sources, SeriesProblem):
        return QuarantineEntry(
            series_folder(h.path for h in geometry.slices),
            sources.reason,
            sources.detail,
            key,
            files=tuple(h.path for h in geometry.slices),
        )
    mask = predict_mask(model.network, image, geometry, model.spec, device=device)
    try:
        with dicom_libraries_silenced():
            seg = build_seg(source_images=sources, mask=mask, provenance=model.provenance)
            return write_seg(
                seg, path=seg_path(out_dir, key), series_key=key, lesion_voxels=int(mask.sum())
            )
    except (ValueError, TypeError, AttributeError, KeyError) as error:  # highdicom's checks
        logger.debug("series %s: no SEG (%s)", key, type(error).__name__)
        return f"highdicom could not make its SEG ({describe_error(error)})"


def _source_datasets(root: Path, geometry: SeriesGeometry) -> list[Dataset] | SeriesProblem:
    """The slices' headers for the SEG, from files with the very bytes that were validated."""
    datasets = []
    for header in geometry.slices:
        try:
            data = (root / header.path).read_bytes()
        except OSError as error:
            return SeriesProblem(
                QuarantineReason.TRUNCATED,
                f"{header.path} could not be read again ({type(error).__name__}); check that the "
                "file is still there and readable by the fedseg user",
            )
        if hashlib.sha256(data).hexdigest() != header.digest:
            return SeriesProblem(
                QuarantineReason.TRUNCATED,
                f"{header.path} changed while fedseg was reading the data folder (an export "
                "still being written?); re-run when the copy has finished",
            )
        datasets.append(dcmread(io.BytesIO(data), stop_before_pixels=True))
    return datasets


@contextmanager
def _series_bar(enabled: bool, total: int) -> Iterator[Callable[[], None]]:
    """A rich progress bar over series on stderr; nothing when disabled or not a terminal."""
    console = Console(stderr=True)
    with progress_bar(
        unit="series", console=console, enabled=enabled and console.is_terminal
    ) as bar:
        task = bar.add_task("Segmenting", total=total)
        yield lambda: bar.advance(task)
