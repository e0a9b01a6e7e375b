"""Site-side DICOM ingestion: walk a folder, group and validate series, decode CT, pair labels.

Labels are DICOM SEG objects or NIfTI masks (`site_app.nifti_labels`). Everything that cannot be
used goes to the quarantine list with a reason; everything usable is still used. Logs name series
by `series_key` and files by relative path, never by patient data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import TypeVar

import highdicom as hd
import numpy as np
from pydicom import dcmread
from pydicom.pixels import get_decoder
from pydicom.uid import UID, CTImageStorage, EnhancedCTImageStorage
from rich.console import Console
from rich.progress import track

from jobs.atomic_files import atomic_write
from site_app.dicom_series import (
    PixelLayout,
    SeriesGeometry,
    SeriesProblem,
    SliceHeader,
    group_by_series,
    read_header,
    series_folder,
    series_geometry,
    series_key,
    series_problems,
    split_identical_copies,
)
from site_app.nifti_labels import (
    MaskFile,
    is_nifti,
    mask_on_series_grid,
    mask_targets,
    read_mask,
    read_mask_file,
)
from site_app.quarantine import QuarantineEntry, QuarantineReason, sorted_entries

__all__ = [
    "IngestionResult",
    "LabelledVolume",
    "NoDicomFoundError",
    "PatientRecord",
    "decode_pixels",
    "ingest_site",
    "series_key",
    "stored_pixels",
]

logger = logging.getLogger(__name__)

CACHE_VERSION = "fedseg-ingest-v2"
"""Part of every cache key and of the header cache: bump it when decoding or `SliceHeader`
changes, so old cache files are not reused."""
HEADER_CACHE_NAME = "headers.json"
VOLUME_SUFFIX = ".npy"
"""A cached volume is one file of four consecutive .npy records: the version, HU (int16 when
whole, else float32), label (uint8) and geometry (spacing 3, orientation 6, origin 3; float64)."""
_PER_FILE_FIELDS = frozenset({"path", "digest", "stamp"})  # not cached: they belong to one file

_FRACTIONAL_LESION_THRESHOLD = 0.5
_T = TypeVar("_T")
Label = SliceHeader | MaskFile
"""A series' label: the header of a DICOM SEG, or a NIfTI mask file."""


@dataclass(frozen=True, eq=False)
class LabelledVolume:
    """One CT series with its lesion label, ready for training.

    ``image_hu`` is float32 (rows, cols, slices) in Hounsfield units (RescaleSlope/Intercept
    applied per slice); ``label`` is uint8 of the same shape, 1 = lesion (any non-zero segment of
    the SEG, or any non-zero voxel of the NIfTI mask, placed on the same grid). Slices ascend
    along the slice normal (row cosine x column cosine). ``spacing_mm`` is (row spacing, column
    spacing, slice spacing); ``orientation`` the 6 ImageOrientationPatient cosines;
    ``origin_mm`` the ImagePositionPatient of the first slice. Arrays are read-only. Equality
    compares array contents.
    """

    series_key: str
    image_hu: np.ndarray = field(repr=False)
    label: np.ndarray = field(repr=False)
    spacing_mm: tuple[float, float, float]
    orientation: tuple[float, ...]
    origin_mm: tuple[float, float, float]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LabelledVolume):
            return NotImplemented
        return (
            self.series_key == other.series_key
            and self.spacing_mm == other.spacing_mm
            and self.orientation == other.orientation
            and self.origin_mm == other.origin_mm
            and self.image_hu.dtype == other.image_hu.dtype
            and np.array_equal(self.image_hu, other.image_hu)
            and self.label.dtype == other.label.dtype
            and np.array_equal(self.label, other.label)
        )


@dataclass(frozen=True)
class PatientRecord:
    """All usable labelled series of one patient: the unit of differential privacy.

    ``patient_key`` is a local pseudonym (``"p-"`` + sha256(PatientID)[:12]); like the ID it must
    never leave the site. ``sex`` ("M", "F", "O" or None), ``age_years``, ``manufacturer`` and
    ``slice_thickness_mm`` come from the first volume (by series_key); files without a PatientID
    all share one record, which over- rather than under-states what one person contributes.
    """

    patient_key: str
    volumes: tuple[LabelledVolume, ...]
    sex: str | None
    age_years: int | None
    manufacturer: str | None
    slice_thickness_mm: float | None


@dataclass(frozen=True)
class IngestionResult:
    """What `ingest_site` found. ``series_found`` counts image series of any modality (SEG label
    objects excluded); ``series_usable`` counts labelled volumes; ``cache_hits`` counts volumes
    read from the cache instead of decoded. ``used_files`` lists (relative POSIX, sorted) the
    files behind the usable volumes: their slices and labels. Every file seen is either there or
    covered by a quarantine entry (`QuarantineEntry.covered_files`)."""

    patients: tuple[PatientRecord, ...]
    quarantine: tuple[QuarantineEntry, ...]
    files_seen: int
    series_found: int
    series_usable: int
    cache_hits: int = 0
    used_files: tuple[str, ...] = field(default=(), repr=False)


class NoDicomFoundError(FileNotFoundError):
    """The data folder exists but holds no DICOM file at all."""


# --- entry point -------------------------------------------------------------------------------


def ingest_site(
    data_dir: Path, *, cache_dir: Path | None = None, progress: bool = False
) -> IngestionResult:
    """Read every DICOM file under ``data_dir`` and return the site's usable labelled volumes.

    Args:
        data_dir: folder with the site's DICOM export, walked recursively (any file names). It is
            only read, never written.
        cache_dir: folder for decoded volumes (``.npy``, keyed by a hash of the files' bytes)
            and parsed headers (``headers.json``); a rerun over unchanged files loads them
            instead of parsing and decoding. Must lie outside ``data_dir``. None disables
            caching.
        progress: show a progress bar (on stderr) while reading and decoding.

    Raises:
        FileNotFoundError / NotADirectoryError: ``data_dir`` is missing or not a folder.
        NoDicomFoundError: no file under ``data_dir`` is DICOM.
        ValueError: ``cache_dir`` lies inside ``data_dir``.
    Bad files never raise: they are returned in ``quarantine``.
    """
    root = _require_data_dir(Path(data_dir))
    cache = _VolumeCache(_require_cache_dir(Path(cache_dir), root)) if cache_dir else None
    files = _walk(root)
    mask_files = [p for p in files if is_nifti(p)]
    known = cache.load_headers() if cache is not None else None
    with _dicom_libraries_silenced():
        reads = [
            read_header(p, root, known)
            for p in _track(
                [p for p in files if not is_nifti(p)], "Reading DICOM headers", progress
            )
        ]
        headers = [r for r in reads if isinstance(r, SliceHeader)]
        if not headers:
            raise NoDicomFoundError(
                f"no DICOM files in {root} ({len(files)} files looked at, none with a DICM "
                "marker); point the site's data path (--data) at the folder holding the DICOM "
                "export"
            )
        if cache is not None:
            cache.store_headers(headers)
        mask_reads = [read_mask_file(p, root) for p in mask_files]
        quarantine = [r for r in (*reads, *mask_reads) if isinstance(r, QuarantineEntry)]
        headers = _drop_images_without_pixels(headers, quarantine)

        series = group_by_series(h for h in headers if not h.is_segmentation)
        valid: dict[str, SeriesGeometry] = {}
        rejected: dict[str, QuarantineReason] = {}
        for uid, group in series.items():
            entries, outcome = _validate_series(uid, group)
            quarantine += entries
            if isinstance(outcome, SeriesGeometry):
                valid[uid] = outcome
            else:
                rejected[uid] = outcome

        labels: dict[str, Label]
        labels, label_entries = _pair_labels(
            [h for h in headers if h.is_segmentation], valid, rejected
        )
        quarantine += label_entries
        masks, mask_entries = _pair_masks(
            [r for r in mask_reads if isinstance(r, MaskFile)], series, rejected, labels
        )
        labels.update(masks)
        quarantine += mask_entries

        volumes: dict[str, list[tuple[LabelledVolume, SliceHeader]]] = defaultdict(list)
        used_files: list[str] = []
        cache_hits = 0
        for uid in _track(list(valid), "Decoding series", progress):
            geometry = valid[uid]
            label = labels.get(uid)
            if label is None:
                quarantine.append(_unlabelled(uid, geometry))
                continue
            volume, entries, hit = _labelled_volume(root, uid, geometry, label, cache)
            quarantine += entries
            cache_hits += hit
            if volume is not None:
                first = geometry.slices[0]
                volumes[first.patient_key].append((volume, first))
                used_files += [h.path for h in geometry.slices] + [label.path]

    patients = tuple(_patient_record(key, volumes[key]) for key in sorted(volumes))
    result = IngestionResult(
        patients=patients,
        quarantine=tuple(sorted_entries(quarantine)),
        files_seen=len(files),
        series_found=len(series),
        series_usable=sum(len(p.volumes) for p in patients),
        cache_hits=cache_hits,
        used_files=tuple(sorted(used_files)),
    )
    # Per entry at debug level only: paths are the site's own names, and a PACS export may name
    # folders after patients. The list itself goes to quarantine.json, which stays at the site.
    for entry in result.quarantine:
        logger.debug("quarantined %s (%s): %s", entry.path, entry.reason.value, entry.detail)
    logger.info(
        "ingested %d files: %d image series, %d usable labelled series of %d patients "
        "(%d from cache), %d quarantine entries",
        result.files_seen,
        result.series_found,
        result.series_usable,
        len(patients),
        cache_hits,
        len(result.quarantine),
    )
    return result


# --- boundary checks ---------------------------------------------------------------------------


def _require_data_dir(data_dir: Path) -> Path:
    if not data_dir.exists():
        raise FileNotFoundError(
            f"data folder {data_dir} does not exist; check the site's data path (--data or the "
            "site config) and that the disk holding it is mounted"
        )
    if not data_dir.is_dir():
        raise NotADirectoryError(
            f"data folder {data_dir} is a file, not a folder; point the site's data path "
            "(--data) at the folder holding the DICOM export"
        )
    return data_dir


def _require_cache_dir(cache_dir: Path, root: Path) -> Path:
    if cache_dir.resolve().is_relative_to(root.resolve()):
        raise ValueError(
            f"cache folder {cache_dir} lies inside the data folder {root}, which fedseg only "
            "reads; choose a cache folder outside it"
        )
    if cache_dir.exists() and not cache_dir.is_dir():
        raise NotADirectoryError(
            f"cache folder {cache_dir} is a file, not a folder; remove it or choose another path"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    return cache_dir


def _walk(root: Path) -> list[Path]:
    """Every file under ``root``, sorted (deterministic); symlinked folders are not followed."""
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders.sort()
        found += [Path(folder) / name for name in sorted(names)]
    return [p for p in found if p.is_file()]


def _track(items: Sequence[_T], description: str, enabled: bool) -> Iterable[_T]:
    if not enabled:
        return items
    return track(items, description=description, console=Console(stderr=True))


@contextmanager
def _dicom_libraries_silenced() -> Iterator[None]:
    """Keep pydicom/highdicom warnings and log records out of logs and stderr while reading site
    data: their validation messages quote header values, which may be patient names, IDs or
    dates. (Levels are raised on the library root loggers, which also covers their per-module
    child loggers; what they would have said is reported by our own quarantine entries.)"""
    library_loggers = [logging.getLogger("pydicom"), logging.getLogger("highdicom")]
    saved_levels = [library_logger.level for library_logger in library_loggers]
    for library_logger in library_loggers:
        library_logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for library_logger, level in zip(library_loggers, saved_levels, strict=True):
            library_logger.setLevel(level)


# --- validation and pairing --------------------------------------------------------------------


def _drop_images_without_pixels(
    headers: list[SliceHeader], quarantine: list[QuarantineEntry]
) -> list[SliceHeader]:
    """A CT or SEG file without Pixel Data was cut short between elements: a file-level fault."""
    kept = []
    for header in headers:
        if not header.has_pixel_data and (
            header.sop_class_uid == CTImageStorage or header.is_segmentation
        ):
            quarantine.append(
                QuarantineEntry(
                    header.path,
                    QuarantineReason.TRUNCATED,
                    "an image object without Pixel Data (cut short during copy?); copy it again "
                    "from the source",
                    series_key(header.series_uid),
                )
            )
        else:
            kept.append(header)
    return kept


def _validate_series(
    uid: str, group: list[SliceHeader]
) -> tuple[list[QuarantineEntry], SeriesGeometry | QuarantineReason]:
    """Quarantine entries for one image series, and its geometry when it is a usable CT volume
    (else the first reason it was rejected for)."""
    key = series_key(uid)
    folder = series_folder(h.path for h in group)
    paths = tuple(h.path for h in group)
    classes = {h.sop_class_uid for h in group}
    if CTImageStorage not in classes:
        if classes == {EnhancedCTImageStorage}:
            detail = (
                f"Enhanced CT (multi-frame, {len(group)} files) is not supported yet; export the "
                "series from PACS as classic CT Image Storage (one file per slice)"
            )
        else:
            modalities = ", ".join(sorted({h.modality or "unknown" for h in group}))
            detail = (
                f"modality {modalities} ({len(group)} files) is not used: fedseg trains on CT "
                "(CT Image Storage) with DICOM SEG labels; nothing to do unless this is CT"
            )
        reason = QuarantineReason.UNSUPPORTED_MODALITY
        return [QuarantineEntry(folder, reason, detail, key, files=paths)], reason

    kept, copies = split_identical_copies(group)
    entries = [
        QuarantineEntry(
            copy.path,
            QuarantineReason.DUPLICATE_INSTANCE,
            f"byte-identical copy of {original.path}; the copy is ignored and series {key} is "
            "still used (you may delete the copy)",
            key,
        )
        for copy, original in copies
    ]
    problems = series_problems(kept)
    kept_paths = tuple(h.path for h in kept)
    entries += [
        QuarantineEntry(folder, p.reason, p.detail, key, files=kept_paths) for p in problems
    ]
    return entries, problems[0].reason if problems else series_geometry(kept)


def _pair_labels(
    segs: list[SliceHeader],
    valid: dict[str, SeriesGeometry],
    rejected: dict[str, QuarantineReason],
) -> tuple[dict[str, SliceHeader], list[QuarantineEntry]]:
    """Match each SEG to the valid CT series it references (first SEG by path wins)."""
    labels: dict[str, SliceHeader] = {}
    entries = []

    def refuse(seg: SliceHeader, reason: QuarantineReason, detail: str, key: str | None) -> None:
        entries.append(QuarantineEntry(seg.path, reason, detail, key))

    for seg in sorted(segs, key=lambda h: h.path):
        referenced = sorted(set(seg.referenced_series_uids))
        if len(referenced) != 1:
            refuse(
                seg,
                QuarantineReason.LABEL_WITHOUT_SERIES,
                "the SEG does not name the series it labels (no ReferencedSeriesSequence); "
                "re-export it from the annotation tool"
                if not referenced
                else f"the SEG labels {len(referenced)} series at once; fedseg expects one SEG "
                "per CT series",
                None,
            )
            continue
        uid = referenced[0]
        key = series_key(uid)
        if uid in rejected:
            refuse(
                seg,
                QuarantineReason.LABEL_WITHOUT_SERIES,
                f"labels series {key}, which was quarantined ({rejected[uid].value}); fix that "
                "series (see its entry) and re-run",
                key,
            )
        elif uid not in valid:
            refuse(
                seg,
                QuarantineReason.LABEL_WITHOUT_SERIES,
                f"labels series {key}, which is not in the data folder; export the CT series "
                "together with its SEG",
                key,
            )
        elif seg.patient_key != valid[uid].slices[0].patient_key:
            refuse(
                seg,
                QuarantineReason.LABEL_WITHOUT_SERIES,
                f"labels series {key} but names a different patient than that series; check "
                "which patient the SEG belongs to",
                key,
            )
        elif uid in labels:
            first = labels[uid]
            refuse(
                seg,
                QuarantineReason.DUPLICATE_INSTANCE,
                f"byte-identical copy of {first.path}; the copy is ignored"
                if seg.digest == first.digest
                else f"a second SEG for series {key}; only {first.path} is used (remove one of "
                "them if the other is the right label)",
                key,
            )
        else:
            labels[uid] = seg
    return labels, entries


def _pair_masks(
    masks: list[MaskFile],
    series: Mapping[str, Sequence[SliceHeader]],
    rejected: Mapping[str, QuarantineReason],
    segs: Mapping[str, SliceHeader],
) -> tuple[dict[str, MaskFile], list[QuarantineEntry]]:
    """Match each NIfTI mask to the image series it labels (`nifti_labels.mask_targets`); a
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


def _unlabelled(uid: str, geometry: SeriesGeometry) -> QuarantineEntry:
    return QuarantineEntry(
        series_folder(h.path for h in geometry.slices),
        QuarantineReason.UNLABELLED_SERIES,
        f"a valid CT series ({len(geometry.slices)} slices) with no label (DICOM SEG or NIfTI "
        "mask); it is not used for supervised training (nothing is wrong with the data)",
        series_key(uid),
        files=tuple(h.path for h in geometry.slices),
    )


# --- decoding and cache ------------------------------------------------------------------------


def _labelled_volume(
    root: Path,
    uid: str,
    geometry: SeriesGeometry,
    label: Label,
    cache: _VolumeCache | None,
) -> tuple[LabelledVolume | None, list[QuarantineEntry], bool]:
    """Decode (or load from the cache) one CT series and its label. Returns (volume or None,
    quarantine entries, whether the cache was used)."""
    key = series_key(uid)
    cache_key = _cache_key(geometry.slices, label)
    if cache is not None and (volume := cache.load(cache_key, key)) is not None:
        return volume, [], True

    folder = series_folder(h.path for h in geometry.slices)
    slice_paths = tuple(h.path for h in geometry.slices)
    image = _decode_image(root, geometry)
    if isinstance(image, SeriesProblem):
        return (
            None,
            [
                QuarantineEntry(folder, image.reason, image.detail, key, files=slice_paths),
                QuarantineEntry(
                    label.path,
                    QuarantineReason.LABEL_WITHOUT_SERIES,
                    f"labels series {key}, which was quarantined ({image.reason.value}); fix "
                    "that series (see its entry) and re-run",
                    key,
                ),
            ],
            False,
        )
    if isinstance(label, MaskFile):
        mask = _decode_mask(root, label, geometry)
    else:
        mask = _decode_label(root, label, geometry, key)
    if isinstance(mask, SeriesProblem):
        return (
            None,
            [
                QuarantineEntry(label.path, mask.reason, mask.detail, key),
                QuarantineEntry(
                    folder,
                    QuarantineReason.UNLABELLED_SERIES,
                    f"a valid CT series ({len(slice_paths)} slices) whose only label, "
                    f"{label.path}, was quarantined (see its entry); it is not used until the "
                    "label is fixed",
                    key,
                    files=slice_paths,
                ),
            ],
            False,
        )

    volume = _frozen_volume(
        key, image, mask, geometry.spacing_mm, geometry.orientation, geometry.origin_mm
    )
    if cache is not None:
        cache.store(cache_key, volume)
    return volume, [], False


def _decode_image(root: Path, geometry: SeriesGeometry) -> np.ndarray | SeriesProblem:
    """HU volume (rows, cols, slices) float32 in the order of ``geometry.slices``."""
    first = geometry.slices[0]
    volume = np.empty((len(geometry.slices), first.rows or 0, first.columns or 0), np.float32)
    for k, header in enumerate(geometry.slices):
        stored = stored_pixels(root / header.path, header)
        if isinstance(stored, SeriesProblem):
            return stored
        if header.rescale is None:
            return SeriesProblem(
                QuarantineReason.UNDECODABLE_PIXELS,
                f"RescaleSlope or RescaleIntercept of {header.path} is not a number, so its "
                "pixels cannot be converted to HU; re-export the series from the scanner/PACS",
            )
        slope, intercept = header.rescale
        np.multiply(stored, np.float32(slope), out=volume[k], dtype=np.float32)
        volume[k] += np.float32(intercept)
    # One transposing copy: slices are decoded as (rows, cols) planes, the volume is slice-last.
    return np.ascontiguousarray(np.moveaxis(volume, 0, -1))


def stored_pixels(path: Path, header: SliceHeader) -> np.ndarray | SeriesProblem:
    """The stored values of one single-frame greyscale image file, (rows, cols), decoded by
    `decode_pixels`; a problem instead of raising. The file must still have the size and
    modification time it had when its header was read (``header.stamp``), so what is decoded is
    what was validated and hashed (and is cached under that hash).
    """
    try:
        with path.open("rb") as handle:
            stat = os.fstat(handle.fileno())
            data = handle.read()
    except OSError as exc:
        return SeriesProblem(
            QuarantineReason.TRUNCATED,
            f"{header.path} could not be read again ({type(exc).__name__}); check that the file "
            "is still there and readable by the fedseg user",
        )
    unchanged = header.stamp in (None, (stat.st_size, stat.st_mtime_ns))
    if not unchanged or len(data) != stat.st_size:
        return SeriesProblem(
            QuarantineReason.TRUNCATED,
            f"{header.path} changed while fedseg was reading the data folder (an export still "
            "being written?); re-run when the copy has finished",
        )
    try:
        stored = decode_pixels(data, header.transfer_syntax_uid, header.pixel_layout)
    except Exception as exc:  # decoder plugins raise many types
        return SeriesProblem(
            QuarantineReason.UNDECODABLE_PIXELS,
            f"pixel data of {header.path} could not be decoded ({_describe(exc)}); export "
            "the series uncompressed (Explicit VR Little Endian) or install the decoder "
            "for its transfer syntax",
        )
    if stored.shape != (header.rows, header.columns):
        what = "colour" if stored.ndim == 3 and stored.shape[-1] in (3, 4) else "unexpected"
        return SeriesProblem(
            QuarantineReason.UNDECODABLE_PIXELS,
            f"pixel data of {header.path} decoded to shape {stored.shape} ({what}), expected "
            f"({header.rows}, {header.columns}) from Rows/Columns: CT slices are single-frame "
            "greyscale; the file is corrupt or not a CT slice",
        )
    return stored


def decode_pixels(
    data: bytes, transfer_syntax_uid: str, layout: PixelLayout | None = None
) -> np.ndarray:
    """Pixel data of one DICOM file's bytes as pydicom decodes it (``Dataset.pixel_array``:
    codec plugins for compressed syntaxes; (rows, cols), (frames, rows, cols) or with samples
    last). Raises what pydicom raises.

    With ``layout`` (from the header read), pydicom's decoder takes the Pixel Data value straight
    from ``data``, so the file is not parsed a second time; without it, or if that fails, the
    file is read whole by ``dcmread`` as usual.
    """
    if layout is not None:
        try:
            value = data[layout.offset : layout.offset + layout.length]
            decoded, _ = get_decoder(UID(transfer_syntax_uid)).as_array(
                value,
                transfer_syntax_uid=UID(transfer_syntax_uid),
                pixel_keyword="PixelData",
                **dict(layout.options),
            )
            return decoded
        except Exception:  # the full read below is the authority when this fails
            pass
    return dcmread(BytesIO(data)).pixel_array


def _decode_mask(
    root: Path, mask: MaskFile, geometry: SeriesGeometry
) -> np.ndarray | SeriesProblem:
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


def _decode_label(
    root: Path, seg_header: SliceHeader, geometry: SeriesGeometry, key: str
) -> np.ndarray | SeriesProblem:
    """Binary lesion mask (rows, cols, slices) uint8 aligned with ``geometry.slices``.

    Any non-zero segment counts as lesion (fractional SEGs: value >= 0.5); CT slices without a
    SEG frame are empty.
    """
    first = geometry.slices[0]
    try:
        seg = hd.seg.segread(root / seg_header.path)
        seg.get_stored_frame(1)  # decode one frame here, so a codec failure is told from a misfit
    except Exception as exc:
        return SeriesProblem(
            QuarantineReason.UNDECODABLE_PIXELS,
            f"the SEG could not be decoded by highdicom ({_describe(exc)}); re-export it from "
            "the annotation tool",
        )
    if (int(seg.Rows), int(seg.Columns)) != (first.rows, first.columns):
        return SeriesProblem(
            QuarantineReason.LABEL_SIZE_MISMATCH,
            f"SEG frames are {seg.Rows}x{seg.Columns} pixels but the slices of series {key} are "
            f"{first.rows}x{first.columns}: the label was drawn on another image; re-export the "
            "SEG for this series",
        )
    in_series = [h.sop_instance_uid for h in geometry.slices]
    foreign = {sop for _, _, sop in seg.get_source_image_uids()} - set(in_series)
    if foreign:
        return SeriesProblem(
            QuarantineReason.LABEL_SIZE_MISMATCH,
            f"the SEG labels {len(foreign)} image(s) that are not among the {len(in_series)} "
            f"slices of series {key}: the series is incomplete or the SEG was made on another "
            "export of it",
        )
    try:
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=in_series,
            assert_missing_frames_are_empty=True,
            skip_overlap_checks=True,
        )
    except Exception as exc:
        return SeriesProblem(
            QuarantineReason.LABEL_SIZE_MISMATCH,
            f"the SEG frames could not be placed on the slices of series {key} "
            f"({_describe(exc)}); re-export the SEG for this series",
        )
    expected = (len(in_series), first.rows, first.columns)
    if pixels.ndim != 4 or pixels.shape[:3] != expected:
        return SeriesProblem(
            QuarantineReason.LABEL_SIZE_MISMATCH,
            f"the SEG decoded to shape {pixels.shape}, expected {expected} + segments for "
            f"series {key}; re-export the SEG for this series",
        )
    lesion = (
        pixels >= _FRACTIONAL_LESION_THRESHOLD
        if np.issubdtype(pixels.dtype, np.floating)
        else pixels > 0
    )
    return _slices_last(lesion.any(axis=-1))


def _slices_last(mask: np.ndarray) -> np.ndarray:
    """A (slices, rows, cols) boolean mask as contiguous uint8 (rows, cols, slices). Only slices
    holding a lesion are copied: lesions are sparse, and a full transposing copy of a byte
    volume costs more than the SEG read itself."""
    out = np.zeros((*mask.shape[1:], mask.shape[0]), dtype=np.uint8)
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        out[:, :, k] = mask[k]
    return out


_UID_LIKE = re.compile(r"\d+(?:\.\d+){3,}")
_MEMORY_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _describe(exc: Exception) -> str:
    """Exception type and message on one line, UIDs masked: for details shown to site admins."""
    message = _UID_LIKE.sub("<uid>", " ".join(str(exc).split()))
    message = _MEMORY_ADDRESS.sub("", message)  # keeps details identical from run to run
    message = message if len(message) <= 200 else message[:199] + "…"
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _frozen_volume(
    key: str,
    image: np.ndarray,
    label: np.ndarray,
    spacing: Sequence[float],
    orientation: Sequence[float],
    origin: Sequence[float],
) -> LabelledVolume:
    image = np.ascontiguousarray(image, dtype=np.float32)
    label = np.ascontiguousarray(label, dtype=np.uint8)
    image.flags.writeable = False
    label.flags.writeable = False
    return LabelledVolume(
        series_key=key,
        image_hu=image,
        label=label,
        spacing_mm=tuple(float(v) for v in spacing),  # type: ignore[arg-type]
        orientation=tuple(float(v) for v in orientation),
        origin_mm=tuple(float(v) for v in origin),  # type: ignore[arg-type]
    )


def _cache_key(slices: Sequence[SliceHeader], label: Label) -> str:
    """sha256 over the version tag and the content digests of the series' files (by path) and of
    its label (SEG or NIfTI): any changed byte gives a new key."""
    digest = hashlib.sha256(CACHE_VERSION.encode())
    for header in sorted(slices, key=lambda h: h.path):
        digest.update(header.digest.encode())
    kind = b"nifti:" if isinstance(label, MaskFile) else b"seg:"
    digest.update(kind + label.digest.encode())
    return digest.hexdigest()


class _VolumeCache:
    """Decoded volumes as ``<key>.npy`` files (`VOLUME_SUFFIX`), and parsed headers by content
    digest in ``headers.json``; writes are atomic (temp file, then rename).

    The header cache lets a rerun over unchanged files skip parsing them: a file is still read
    and hashed, and a file whose bytes changed gets a new digest and is parsed again. It holds
    what `SliceHeader` holds (UIDs and patient pseudonyms, no names or dates) and, like the
    decoded volumes, must stay at the site.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._headers_loaded: frozenset[str] = frozenset()

    def load_headers(self) -> dict[str, SliceHeader]:
        """Headers stored by an earlier run, by content digest ({} if none or unreadable)."""
        path = self.directory / HEADER_CACHE_NAME
        if not path.exists():
            return {}
        names = {f.name for f in dataclasses.fields(SliceHeader)} - _PER_FILE_FIELDS
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
            if document.get("version") != CACHE_VERSION:
                return {}
            headers = {}
            for digest, fields in document["headers"].items():
                if set(fields) != names:
                    return {}
                values = {k: _tuples(v) for k, v in fields.items()}
                if values["pixel_layout"] is not None:
                    values["pixel_layout"] = PixelLayout(**values["pixel_layout"])
                headers[digest] = SliceHeader(path="", digest=digest, **values)
        except Exception as exc:
            logger.warning(
                "header cache %s is unreadable (%s); parsing every file again",
                path.name,
                type(exc).__name__,
            )
            return {}
        self._headers_loaded = frozenset(headers)
        return headers

    def store_headers(self, headers: Sequence[SliceHeader]) -> None:
        """Keep the headers of this run (only these: files gone since are forgotten)."""
        by_digest = {h.digest: h for h in headers}
        if frozenset(by_digest) == self._headers_loaded:
            return
        document = {
            "version": CACHE_VERSION,
            "headers": {
                digest: {
                    k: v for k, v in dataclasses.asdict(header).items() if k not in _PER_FILE_FIELDS
                }
                for digest, header in sorted(by_digest.items())
            },
        }
        try:
            self._write_atomically(
                HEADER_CACHE_NAME, lambda handle: handle.write(json.dumps(document).encode())
            )
        except OSError as exc:
            logger.warning(
                "could not write the header cache (%s); files will be parsed again next run",
                type(exc).__name__,
            )
            return
        self._headers_loaded = frozenset(by_digest)

    def _write_atomically(self, name: str, write) -> None:
        atomic_write(self.directory / name, write, durable=False, prefix=".")

    def load(self, cache_key: str, key: str) -> LabelledVolume | None:
        path = self.directory / f"{cache_key}{VOLUME_SUFFIX}"
        if not path.exists():
            return None
        try:
            with path.open("rb") as handle:
                version, image, label, geometry = (
                    np.load(handle, allow_pickle=False) for _ in range(4)
                )
            if str(version) != CACHE_VERSION:
                return None
            volume = _frozen_volume(
                key, image, label, geometry[:3].tolist(), geometry[3:9].tolist(), geometry[9:]
            )
        except Exception as exc:
            logger.warning(
                "cache file %s for series %s is unreadable (%s); decoding again",
                path.name,
                key,
                type(exc).__name__,
            )
            return None
        if volume.image_hu.shape != volume.label.shape or volume.image_hu.ndim != 3:
            logger.warning("cache file %s for series %s is inconsistent; decoding again", path, key)
            return None
        logger.debug("series %s loaded from cache", key)
        return volume

    def store(self, cache_key: str, volume: LabelledVolume) -> None:
        # Whole HU that fit int16 (the usual CT case) are stored as such: half the bytes.
        as_int16 = volume.image_hu.astype(np.int16)
        exact = np.array_equal(as_int16, volume.image_hu)
        records = (
            np.array(CACHE_VERSION),
            as_int16 if exact else volume.image_hu,
            volume.label,
            np.array([*volume.spacing_mm, *volume.orientation, *volume.origin_mm]),
        )

        def write(handle) -> None:
            for record in records:
                np.save(handle, record, allow_pickle=False)

        try:
            self._write_atomically(f"{cache_key}{VOLUME_SUFFIX}", write)
        except OSError as exc:
            logger.warning(
                "could not write the cache for series %s (%s); it will be decoded again next run",
                volume.series_key,
                type(exc).__name__,
            )


def _tuples(value: object) -> object:
    """JSON lists back to the tuples `SliceHeader` holds, at any depth."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


# --- patients ----------------------------------------------------------------------------------


def _patient_record(key: str, volumes: list[tuple[LabelledVolume, SliceHeader]]) -> PatientRecord:
    ordered = sorted(volumes, key=lambda item: item[0].series_key)
    first = ordered[0][1]
    return PatientRecord(
        patient_key=key,
        volumes=tuple(volume for volume, _ in ordered),
        sex=first.sex,
        age_years=first.age_years,
        manufacturer=first.manufacturer,
        slice_thickness_mm=first.slice_thickness_mm,
    )
