"""Site-side DICOM ingestion: walk a folder, group and validate series, decode CT, pair DICOM SEG.

Everything that cannot be used goes to the quarantine list with a reason; everything usable is
still used. Logs name series by `series_key` and files by relative path, never by patient data.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import highdicom as hd
import numpy as np
from pydicom import dcmread
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage
from rich.console import Console
from rich.progress import track

from site_app.dicom_series import (
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
from site_app.quarantine import QuarantineEntry, QuarantineReason, sorted_entries

__all__ = [
    "IngestionResult",
    "LabelledVolume",
    "NoDicomFoundError",
    "PatientRecord",
    "ingest_site",
    "series_key",
]

logger = logging.getLogger(__name__)

CACHE_VERSION = "fedseg-ingest-v1"
"""Part of every cache key: bump it when decoding changes so old cache files are not reused."""

_FRACTIONAL_LESION_THRESHOLD = 0.5
_T = TypeVar("_T")


@dataclass(frozen=True, eq=False)
class LabelledVolume:
    """One CT series with its lesion label, ready for training.

    ``image_hu`` is float32 (rows, cols, slices) in Hounsfield units (RescaleSlope/Intercept
    applied per slice); ``label`` is uint8 of the same shape, 1 = lesion (any non-zero segment of
    the SEG). Slices ascend along the slice normal (row cosine x column cosine). ``spacing_mm`` is
    (row spacing, column spacing, slice spacing); ``orientation`` the 6 ImageOrientationPatient
    cosines; ``origin_mm`` the ImagePositionPatient of the first slice. Arrays are read-only.
    Equality compares array contents.
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
    read from the cache instead of decoded."""

    patients: tuple[PatientRecord, ...]
    quarantine: tuple[QuarantineEntry, ...]
    files_seen: int
    series_found: int
    series_usable: int
    cache_hits: int = 0


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
        cache_dir: folder for decoded volumes (``.npz``, keyed by a hash of the files' bytes); a
            rerun over unchanged files loads them instead of decoding. Must lie outside
            ``data_dir``. None disables caching.
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
    with _dicom_libraries_silenced():
        reads = [read_header(p, root) for p in _track(files, "Reading DICOM headers", progress)]
        headers = [r for r in reads if isinstance(r, SliceHeader)]
        if not headers:
            raise NoDicomFoundError(
                f"no DICOM files in {root} ({len(files)} files looked at, none with a DICM "
                "marker); point the site's data path (--data) at the folder holding the DICOM "
                "export"
            )
        quarantine = [r for r in reads if isinstance(r, QuarantineEntry)]
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

        labels, label_entries = _pair_labels(
            [h for h in headers if h.is_segmentation], valid, rejected
        )
        quarantine += label_entries

        volumes: dict[str, list[tuple[LabelledVolume, SliceHeader]]] = defaultdict(list)
        cache_hits = 0
        for uid in _track(list(valid), "Decoding series", progress):
            geometry = valid[uid]
            seg = labels.get(uid)
            if seg is None:
                quarantine.append(_unlabelled(uid, geometry))
                continue
            volume, entries, hit = _labelled_volume(root, uid, geometry, seg, cache)
            quarantine += entries
            cache_hits += hit
            if volume is not None:
                first = geometry.slices[0]
                volumes[first.patient_key].append((volume, first))

    patients = tuple(_patient_record(key, volumes[key]) for key in sorted(volumes))
    result = IngestionResult(
        patients=patients,
        quarantine=tuple(sorted_entries(quarantine)),
        files_seen=len(files),
        series_found=len(series),
        series_usable=sum(len(p.volumes) for p in patients),
        cache_hits=cache_hits,
    )
    for entry in result.quarantine:
        logger.info("quarantined %s (%s): %s", entry.path, entry.reason.value, entry.detail)
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
        return [QuarantineEntry(folder, reason, detail, key)], reason

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
    entries += [QuarantineEntry(folder, p.reason, p.detail, key) for p in problems]
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


def _unlabelled(uid: str, geometry: SeriesGeometry) -> QuarantineEntry:
    return QuarantineEntry(
        series_folder(h.path for h in geometry.slices),
        QuarantineReason.UNLABELLED_SERIES,
        f"a valid CT series ({len(geometry.slices)} slices) with no DICOM SEG label; it is not "
        "used for supervised training (nothing is wrong with the data)",
        series_key(uid),
    )


# --- decoding and cache ------------------------------------------------------------------------


def _labelled_volume(
    root: Path,
    uid: str,
    geometry: SeriesGeometry,
    seg: SliceHeader,
    cache: _VolumeCache | None,
) -> tuple[LabelledVolume | None, list[QuarantineEntry], bool]:
    """Decode (or load from the cache) one CT series and its SEG. Returns (volume or None,
    quarantine entries, whether the cache was used)."""
    key = series_key(uid)
    cache_key = _cache_key(geometry.slices, seg)
    if cache is not None and (volume := cache.load(cache_key, key)) is not None:
        return volume, [], True

    image = _decode_image(root, geometry)
    if isinstance(image, SeriesProblem):
        folder = series_folder(h.path for h in geometry.slices)
        return (
            None,
            [
                QuarantineEntry(folder, image.reason, image.detail, key),
                QuarantineEntry(
                    seg.path,
                    QuarantineReason.LABEL_WITHOUT_SERIES,
                    f"labels series {key}, which was quarantined ({image.reason.value}); fix "
                    "that series (see its entry) and re-run",
                    key,
                ),
            ],
            False,
        )
    label = _decode_label(root, seg, geometry, key)
    if isinstance(label, SeriesProblem):
        return None, [QuarantineEntry(seg.path, label.reason, label.detail, key)], False

    volume = _frozen_volume(
        key, image, label, geometry.spacing_mm, geometry.orientation, geometry.origin_mm
    )
    if cache is not None:
        cache.store(cache_key, volume)
    return volume, [], False


def _decode_image(root: Path, geometry: SeriesGeometry) -> np.ndarray | SeriesProblem:
    """HU volume (rows, cols, slices) float32 in the order of ``geometry.slices``."""
    planes = []
    for header in geometry.slices:
        try:
            ds = dcmread(root / header.path)
            stored = ds.pixel_array
            slope = _number(ds.get("RescaleSlope"), default=1.0)
            intercept = _number(ds.get("RescaleIntercept"), default=0.0)
        except Exception as exc:  # decoder plugins raise many types
            return SeriesProblem(
                QuarantineReason.UNDECODABLE_PIXELS,
                f"pixel data of {header.path} could not be decoded ({_describe(exc)}); export "
                "the series uncompressed (Explicit VR Little Endian) or install the decoder "
                "for its transfer syntax",
            )
        if stored.shape != (header.rows, header.columns):
            return SeriesProblem(
                QuarantineReason.UNDECODABLE_PIXELS,
                f"pixel data of {header.path} decoded to shape {stored.shape}, expected "
                f"({header.rows}, {header.columns}) from Rows/Columns; the file is corrupt",
            )
        planes.append(stored.astype(np.float32) * np.float32(slope) + np.float32(intercept))
    return np.stack(planes, axis=-1).astype(np.float32, copy=False)


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
        _ = seg.pixel_array  # decode once here so a codec failure is told apart from a misfit
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
    return np.moveaxis(lesion.any(axis=-1), 0, -1).astype(np.uint8)


def _number(value: object, *, default: float) -> float:
    if value is None or value == "":
        return default
    return float(value)  # type: ignore[arg-type]


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


def _cache_key(slices: Sequence[SliceHeader], seg: SliceHeader) -> str:
    """sha256 over the version tag and the content digests of the series' files (by path) and of
    the SEG: any changed byte gives a new key."""
    digest = hashlib.sha256(CACHE_VERSION.encode())
    for header in sorted(slices, key=lambda h: h.path):
        digest.update(header.digest.encode())
    digest.update(b"seg:" + seg.digest.encode())
    return digest.hexdigest()


class _VolumeCache:
    """Decoded volumes as ``<key>.npz`` files; writes are atomic (temp file, then rename)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def load(self, cache_key: str, key: str) -> LabelledVolume | None:
        path = self.directory / f"{cache_key}.npz"
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                if str(stored["version"]) != CACHE_VERSION:
                    return None
                volume = _frozen_volume(
                    key,
                    stored["image_hu"],
                    stored["label"],
                    stored["spacing_mm"].tolist(),
                    stored["orientation"].tolist(),
                    stored["origin_mm"].tolist(),
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
        fd, tmp_name = tempfile.mkstemp(dir=self.directory, prefix=".", suffix=".npz.tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(
                    handle,
                    version=np.array(CACHE_VERSION),
                    image_hu=volume.image_hu,
                    label=volume.label,
                    spacing_mm=np.array(volume.spacing_mm),
                    orientation=np.array(volume.orientation),
                    origin_mm=np.array(volume.origin_mm),
                )
            os.replace(tmp_name, self.directory / f"{cache_key}.npz")
        except OSError as exc:
            Path(tmp_name).unlink(missing_ok=True)
            logger.warning(
                "could not write the cache for series %s (%s); it will be decoded again next run",
                volume.series_key,
                type(exc).__name__,
            )


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
