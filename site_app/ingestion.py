"""Site-side DICOM ingestion: walk a folder, group and validate series, pair labels, decode.

This module orchestrates the steps and owns the series-level decisions (which series are usable
CT volumes, which label each gets, what goes to quarantine); the steps live beside it: headers
`site_app.dicom_headers`, series checks `site_app.dicom_series`, SEG labels
`site_app.seg_pairing`, NIfTI masks `site_app.nifti_labels`, CT pixels `site_app.ct_pixels`,
the content-hash cache `site_app.volume_cache`, the records handed on `site_app.volumes`.
Everything that cannot be used goes to the quarantine list with a reason; everything usable is
still used. Logs name series by `series_key` and files by relative path, never by patient data.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from pydicom.uid import CTImageStorage, EnhancedCTImageStorage
from rich.console import Console

from jobs.progress import progress_bar
from site_app.ct_pixels import decode_hu_volume
from site_app.dicom_headers import SliceHeader, read_header
from site_app.dicom_series import (
    SeriesGeometry,
    SeriesProblem,
    group_by_series,
    series_folder,
    series_geometry,
    series_key,
    series_problems,
    split_identical_copies,
)
from site_app.nifti_labels import (
    MaskFile,
    decode_mask,
    is_nifti,
    pair_masks,
    read_mask_file,
)
from site_app.quarantine import QuarantineEntry, QuarantineReason, sorted_entries
from site_app.quiet_libraries import DICOM_LIBRARIES, libraries_silenced
from site_app.seg_pairing import decode_seg_mask, pair_segs
from site_app.volume_cache import VolumeCache, cache_key, require_cache_dir
from site_app.volumes import LabelledVolume, PatientRecord, frozen_volume

__all__ = [
    "IngestionResult",
    "NoDicomFoundError",
    "dicom_libraries_silenced",
    "drop_images_without_pixels",
    "ingest_site",
    "require_data_dir",
    "validate_series",
    "walk_files",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
Label = SliceHeader | MaskFile
"""A series' label: the header of a DICOM SEG, or a NIfTI mask file."""


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
    root = require_data_dir(Path(data_dir))
    cache = VolumeCache(require_cache_dir(Path(cache_dir), root)) if cache_dir else None
    files = walk_files(root)
    mask_files = [p for p in files if is_nifti(p)]
    known = cache.load_headers() if cache is not None else None
    with dicom_libraries_silenced():
        reads = [
            read_header(p, root, known)
            for p in _track(
                [p for p in files if not is_nifti(p)], "Reading DICOM headers", "files", progress
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
        headers = drop_images_without_pixels(headers, quarantine)

        series = group_by_series(h for h in headers if not h.is_segmentation)
        valid: dict[str, SeriesGeometry] = {}
        rejected: dict[str, QuarantineReason] = {}
        for uid, group in series.items():
            entries, outcome = validate_series(uid, group)
            quarantine += entries
            if isinstance(outcome, SeriesGeometry):
                valid[uid] = outcome
            else:
                rejected[uid] = outcome

        labels: dict[str, Label]
        labels, label_entries = pair_segs(
            [h for h in headers if h.is_segmentation], valid, rejected
        )
        quarantine += label_entries
        masks, mask_entries = pair_masks(
            [r for r in mask_reads if isinstance(r, MaskFile)], series, rejected, labels
        )
        labels.update(masks)
        quarantine += mask_entries

        volumes: dict[str, list[tuple[LabelledVolume, SliceHeader]]] = defaultdict(list)
        used_files: list[str] = []
        cache_hits = 0
        for uid in _track(list(valid), "Decoding series", "series", progress):
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


def require_data_dir(data_dir: Path) -> Path:
    """``data_dir`` if it is an existing folder; else an error saying what to fix."""
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


def walk_files(root: Path) -> list[Path]:
    """Every file under ``root``, sorted (deterministic); symlinked folders are not followed."""
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders.sort()
        found += [Path(folder) / name for name in sorted(names)]
    return [p for p in found if p.is_file()]


def _track(items: Sequence[_T], description: str, unit: str, enabled: bool) -> Iterator[_T]:
    """``items`` one by one, under fedseg's progress bar on stderr when ``enabled``."""
    with progress_bar(unit=unit, console=Console(stderr=True), enabled=enabled) as bar:
        yield from bar.track(items, description=description)


def dicom_libraries_silenced():
    """Keep pydicom/highdicom warnings and log records out of logs and stderr while reading site
    data: their validation messages quote header values, which may be patient names, IDs or
    dates (``quiet_libraries``)."""
    return libraries_silenced(*DICOM_LIBRARIES)


# --- validation --------------------------------------------------------------------------------


def drop_images_without_pixels(
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


def validate_series(
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


def _unlabelled(uid: str, geometry: SeriesGeometry) -> QuarantineEntry:
    return QuarantineEntry(
        series_folder(h.path for h in geometry.slices),
        QuarantineReason.UNLABELLED_SERIES,
        f"a valid CT series ({len(geometry.slices)} slices) with no label (DICOM SEG or NIfTI "
        "mask); it is not used for supervised training (nothing is wrong with the data)",
        series_key(uid),
        files=tuple(h.path for h in geometry.slices),
    )


# --- one labelled volume -----------------------------------------------------------------------


def _labelled_volume(
    root: Path,
    uid: str,
    geometry: SeriesGeometry,
    label: Label,
    cache: VolumeCache | None,
) -> tuple[LabelledVolume | None, list[QuarantineEntry], bool]:
    """Decode (or load from the cache) one CT series and its label. Returns (volume or None,
    quarantine entries, whether the cache was used)."""
    key = series_key(uid)
    content_key = cache_key(geometry.slices, label)
    if cache is not None and (volume := cache.load(content_key, key)) is not None:
        return volume, [], True

    folder = series_folder(h.path for h in geometry.slices)
    slice_paths = tuple(h.path for h in geometry.slices)
    image = decode_hu_volume(root, geometry)
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
        mask = decode_mask(root, label, geometry)
    else:
        mask = decode_seg_mask(root, label, geometry, key)
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

    volume = frozen_volume(
        key, image, mask, geometry.spacing_mm, geometry.orientation, geometry.origin_mm
    )
    if cache is not None:
        cache.store(content_key, volume)
    return volume, [], False


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
