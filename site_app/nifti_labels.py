"""NIfTI lesion masks, for sites whose annotations live outside PACS: find, pair and place them.

A mask labels one CT series (the convention is in docs/data-formats.md): a file named
``<SeriesInstanceUID>.nii`` / ``.nii.gz`` anywhere in the data folder labels that series; any
other ``.nii`` / ``.nii.gz`` labels the one image series whose files lie in the mask's folder or
below it. Voxels are placed on the series' grid through the mask's affine (NIfTI: RAS mm) and the
series' DICOM geometry (LPS mm); a mask on any other grid is quarantined, never resampled.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from site_app.dicom_headers import SliceHeader
from site_app.dicom_series import SeriesGeometry, SeriesProblem, series_folder, series_key
from site_app.geometry import series_affine_lps
from site_app.quarantine import QuarantineEntry, QuarantineReason

__all__ = [
    "MaskFile",
    "decode_mask",
    "is_nifti",
    "mask_on_series_grid",
    "mask_targets",
    "pair_masks",
    "read_mask",
    "read_mask_file",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
GRID_TOLERANCE_VOXELS = 0.1
"""Largest misplacement, in voxels anywhere in the mask, still read as the series' own grid."""
MAX_LABEL_VALUE = 255
"""Largest label number a mask may hold; a file with larger values is taken for an image."""
_PARALLEL_TOLERANCE = 0.15
"""Largest direction-cosine deviation (about 8.6 degrees) at which a mask axis is still matched
to a series axis; a smaller tilt is then measured in voxels against GRID_TOLERANCE_VOXELS."""
_FRACTIONAL_LESION_THRESHOLD = 0.5
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class MaskFile:
    """A NIfTI file in the data folder: ``path`` relative POSIX, ``digest`` sha256 of its bytes."""

    path: str
    digest: str

    @property
    def named_series_uid(self) -> str:
        """The file name without ``.nii`` / ``.nii.gz``: a SeriesInstanceUID if it follows the
        naming rule."""
        name = PurePosixPath(self.path).name
        return next(name[: -len(s)] for s in NIFTI_SUFFIXES if name.endswith(s))


def is_nifti(path: str | Path) -> bool:
    """True for ``.nii`` and ``.nii.gz`` file names (case-insensitive)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def read_mask_file(path: Path, root: Path) -> MaskFile | QuarantineEntry:
    """Hash one NIfTI file (its content is read later, only if it is paired with a series)."""
    rel = path.relative_to(root).as_posix()
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        return QuarantineEntry(
            rel,
            QuarantineReason.TRUNCATED,
            f"could not be read ({type(exc).__name__}); check that the file is complete and "
            "readable by the fedseg user",
        )
    return MaskFile(rel, digest)


# --- pairing (pure) ------------------------------------------------------------------------------


def mask_targets(
    masks: Sequence[MaskFile], series_folders: Mapping[str, str]
) -> tuple[dict[str, list[MaskFile]], list[QuarantineEntry]]:
    """Which image series each mask labels.

    Args:
        masks: the NIfTI files found.
        series_folders: SeriesInstanceUID -> the folder holding all its files (relative POSIX,
            as `series_folder` gives it), for every image series (any modality, valid or not;
            not SEG).

    Returns:
        ``(candidates, entries)``: for each series, the masks that label it, those named after
        it first, then by path; and a quarantine entry for each mask that labels no series or
        cannot tell which.
    """
    below: dict[PurePosixPath, list[str]] = defaultdict(list)
    for uid, folder in series_folders.items():
        path = PurePosixPath(folder)
        for ancestor in (path, *path.parents):
            below[ancestor].append(uid)
    named: dict[str, list[MaskFile]] = defaultdict(list)
    by_folder: dict[str, list[MaskFile]] = defaultdict(list)
    entries = []
    for mask in sorted(masks, key=lambda m: m.path):
        if mask.named_series_uid in series_folders:
            named[mask.named_series_uid].append(mask)
            continue
        folder = PurePosixPath(mask.path).parent
        found = below.get(folder, [])
        if len(found) == 1:
            by_folder[found[0]].append(mask)
            continue
        where = "the data folder" if str(folder) == "." else f"folder {folder}"
        entries.append(
            QuarantineEntry(
                mask.path,
                QuarantineReason.LABEL_WITHOUT_SERIES,
                f"a NIfTI mask, but {where} holds {len(found)} image series (in it or below it) "
                "and the file is not named after one; put the mask in the folder of the one "
                "series it labels, or name it <SeriesInstanceUID>.nii.gz"
                if found
                else f"a NIfTI mask, but {where} holds no image series (in it or below it) and "
                "the file is not named after one in the data folder; put the mask next to the "
                "series it labels, or name it <SeriesInstanceUID>.nii.gz",
            )
        )
    candidates = {
        uid: named.get(uid, []) + by_folder.get(uid, []) for uid in sorted({*named, *by_folder})
    }
    return candidates, entries


def pair_masks(
    masks: list[MaskFile],
    series: Mapping[str, Sequence[SliceHeader]],
    rejected: Mapping[str, QuarantineReason],
    segs: Mapping[str, SliceHeader],
) -> tuple[dict[str, MaskFile], list[QuarantineEntry]]:
    """Match each NIfTI mask to the image series it labels (`mask_targets`); a
    series' DICOM SEG wins over masks, a mask named after the series over one found by folder,
    then the first by path."""
    folders = {uid: series_folder(h.path for h in group) for uid, group in series.items()}
    candidates, entries = mask_targets(masks, folders)
    paired: dict[str, MaskFile] = {}
    for uid, found in candidates.items():
        key = series_key(uid)
        for mask in found:
            if uid in rejected:
                detail = (
                    f"labels series {key}, which was quarantined ({rejected[uid].value}); fix "
                    "that series (see its entry) and re-run"
                )
                reason = QuarantineReason.LABEL_WITHOUT_SERIES
            elif uid in segs:
                detail = (
                    f"a NIfTI mask for series {key}, which already has the DICOM SEG "
                    f"{segs[uid].path}; the mask is ignored (remove one of them if the mask is "
                    "the right label)"
                )
                reason = QuarantineReason.DUPLICATE_INSTANCE
            elif uid in paired:
                first = paired[uid]
                detail = (
                    f"byte-identical copy of {first.path}; the copy is ignored"
                    if mask.digest == first.digest
                    else f"a second NIfTI mask for series {key}; only {first.path} is used "
                    "(remove one of them if the other is the right label)"
                )
                reason = QuarantineReason.DUPLICATE_INSTANCE
            else:
                paired[uid] = mask
                continue
            entries.append(QuarantineEntry(mask.path, reason, detail, key))
    return paired, entries


# --- reading (I/O) -------------------------------------------------------------------------------


def read_mask(path: Path) -> tuple[np.ndarray, np.ndarray] | SeriesProblem:
    """A NIfTI mask's voxels (3-D, as stored) and its voxel -> RAS mm affine (4, 4).

    The affine is the sform if its code is set, else the qform (nibabel's choice); a file with
    neither has no place in space and is refused, as is a file that is not one 3-D volume.
    """
    import nibabel  # imported here: only sites with NIfTI masks pay for it

    try:
        image = nibabel.load(os.fspath(path))
        _, sform_code = image.header.get_sform(coded=True)
        _, qform_code = image.header.get_qform(coded=True)
        data = np.asanyarray(image.dataobj)
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as exc:  # nibabel and gzip raise many types on broken files
        return SeriesProblem(
            QuarantineReason.UNDECODABLE_PIXELS,
            f"the NIfTI mask could not be read by nibabel ({type(exc).__name__}); export it "
            "again from the annotation tool",
        )
    if not sform_code and not qform_code:
        return SeriesProblem(
            QuarantineReason.MISSING_GEOMETRY,
            "the NIfTI mask has no orientation (sform_code and qform_code are both 0), so its "
            "voxels cannot be placed on the series; save it with the image's geometry (e.g. from "
            "the tool that loaded the DICOM series)",
        )
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        return SeriesProblem(
            QuarantineReason.LABEL_SIZE_MISMATCH,
            f"the NIfTI mask has shape {data.shape}; fedseg expects one 3-D mask per series",
        )
    return data, affine


def decode_mask(root: Path, mask: MaskFile, geometry: SeriesGeometry) -> np.ndarray | SeriesProblem:
    """Binary lesion mask (rows, cols, slices) uint8 from a NIfTI file, on the series' grid."""
    path = root / mask.path
    try:
        unchanged = hashlib.sha256(path.read_bytes()).hexdigest() == mask.digest
    except OSError as exc:
        return SeriesProblem(
            QuarantineReason.TRUNCATED,
            f"could not be read again ({type(exc).__name__}); check that the file is still there "
            "and readable by the fedseg user",
        )
    if not unchanged:
        return SeriesProblem(
            QuarantineReason.TRUNCATED,
            "changed while fedseg was reading the data folder; re-run when the copy has finished",
        )
    read = read_mask(path)
    if isinstance(read, SeriesProblem):
        return read
    data, affine = read
    return mask_on_series_grid(data, affine, geometry)


# --- placing on the series grid (pure) -----------------------------------------------------------


def mask_on_series_grid(
    data: np.ndarray, affine_ras: np.ndarray, geometry: SeriesGeometry
) -> np.ndarray | SeriesProblem:
    """The mask as a binary lesion label on the series' grid, uint8 (rows, cols, slices).

    The mask must cover exactly the series' voxels, its axes being the series' axes in any order
    and direction (as NIfTI converters write them). Any non-zero voxel is lesion (values
    >= 0.5 for fractional masks). A file with negative values, whole numbers above
    `MAX_LABEL_VALUE` or fractions above 1 is an image, not a mask, and is refused.
    """
    from nibabel.affines import from_matvec  # imported here: only sites with NIfTI masks pay
    from nibabel.orientations import apply_orientation, io_orientation

    key = series_key(geometry.slices[0].series_uid)
    first = geometry.slices[0]
    shape = (int(first.rows or 0), int(first.columns or 0), len(geometry.slices))
    refuse = _refusal(key)
    series = series_affine_lps(geometry)
    mask = _RAS_TO_LPS @ affine_ras
    mask_spacing = np.linalg.norm(mask[:3, :3], axis=0)  # mm per step along each mask axis
    if not np.all(np.isfinite(mask)) or not np.all(mask_spacing > 0):
        return refuse("its affine is degenerate (zero or non-finite voxel size)")
    # cosines[a, b]: how mask axis b runs along series axis a (rows, columns, slices)
    cosines = (series[:3, :3] / np.asarray(geometry.spacing_mm)).T @ (mask[:3, :3] / mask_spacing)
    signed = np.rint(cosines)
    if not (
        np.all(np.abs(signed).sum(axis=0) == 1)
        and np.all(np.abs(signed).sum(axis=1) == 1)
        and np.max(np.abs(cosines - signed)) <= _PARALLEL_TOLERANCE
    ):
        return refuse("its axes are not parallel to the series' rows, columns and slices")
    # nibabel's orientation algebra: mask axis b -> (series axis, direction); on every matching
    # the check above accepts, it agrees with reading the axes off ``signed``.
    ornt = io_orientation(from_matvec(cosines))
    axes = [int(b) for b in np.argsort(ornt[:, 0])]  # axes[a]: the mask axis along series axis a
    signs = [float(ornt[b, 1]) for b in axes]
    mask_shape = tuple(data.shape[b] for b in axes)
    problems = []
    if mask_shape != shape:
        problems.append(
            f"it is {_shape(mask_shape)} voxels, the series {_shape(shape)} (rows x columns x "
            "slices)"
        )
    spacing_ratio = mask_spacing[axes] / np.asarray(geometry.spacing_mm)
    if np.any(np.abs(spacing_ratio - 1) * (np.asarray(mask_shape) - 1) > GRID_TOLERANCE_VOXELS):
        problems.append(
            f"its voxels are {_mm(mask_spacing[axes])} mm, the series' "
            f"{_mm(geometry.spacing_mm)} mm"
        )
    else:
        to_series = np.linalg.solve(series, mask)  # mask index -> series index
        linear, offset = to_series[:3, :3], to_series[:3, 3]
        drift = np.abs(linear - signed) @ (np.asarray(data.shape, dtype=np.float64) - 1)
        if np.any(drift > GRID_TOLERANCE_VOXELS):
            problems.append(f"its axes are tilted against the series' ({drift.max():.1f} voxels)")
        expected = np.array(
            [0.0 if s > 0 else n - 1 for s, n in zip(signs, mask_shape, strict=True)]
        )
        if np.any(np.abs(offset - expected) > GRID_TOLERANCE_VOXELS):
            shift_mm = float(np.linalg.norm((offset - expected) * np.asarray(geometry.spacing_mm)))
            problems.append(f"it is shifted by {shift_mm:.2f} mm from the series")
    if problems:
        return refuse("; ".join(problems))

    if not _looks_like_mask(data):
        return SeriesProblem(
            QuarantineReason.UNSUPPORTED_MODALITY,
            f"the NIfTI file holds values from {float(np.nanmin(data)):g} to "
            f"{float(np.nanmax(data)):g}: an image, not a label mask (a mask holds whole "
            f"numbers 0-{MAX_LABEL_VALUE} or fractions in [0, 1]); series {key} is not labelled "
            "by it",
        )
    placed = apply_orientation(data, ornt)
    if np.issubdtype(placed.dtype, np.floating):
        lesion = np.nan_to_num(placed, nan=0.0) >= _FRACTIONAL_LESION_THRESHOLD
    else:
        lesion = placed > 0
    return np.ascontiguousarray(lesion, dtype=np.uint8)


def _looks_like_mask(data: np.ndarray) -> bool:
    """Whole numbers 0..MAX_LABEL_VALUE, or fractions in [0, 1] (NaN ignored)."""
    if data.size == 0 or np.issubdtype(data.dtype, np.bool_):
        return True
    if np.issubdtype(data.dtype, np.floating) and np.all(np.isnan(data)):
        return True
    low, high = float(np.nanmin(data)), float(np.nanmax(data))
    if low < 0 or high > MAX_LABEL_VALUE:
        return False
    if high <= 1 or np.issubdtype(data.dtype, np.integer):
        return True
    finite = data[np.isfinite(data)]
    return bool(np.all(finite == np.round(finite)))


def _refusal(key: str) -> Callable[[str], SeriesProblem]:
    def refuse(why: str) -> SeriesProblem:
        return SeriesProblem(
            QuarantineReason.LABEL_SIZE_MISMATCH,
            f"the NIfTI mask does not lie on the voxel grid of series {key}: {why}; save the mask "
            "on the series' own grid (e.g. from the tool that loaded this DICOM series), or "
            "check that it belongs to this series",
        )

    return refuse


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(int(n)) for n in shape)


def _mm(spacing: Sequence[float]) -> str:
    return "x".join(f"{float(s):.3f}" for s in spacing)
