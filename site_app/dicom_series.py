"""DICOM series: group file headers by series, and check that a group forms one volume.

Pure functions over `SliceHeader`s (read by `site_app.dicom_headers`): grouping by
SeriesInstanceUID, setting byte-identical copies aside, every geometry/consistency problem that
stops a series being one regular volume, and the geometry of a series that passed (slices in
order, spacing and origin in mm). Problems name the series by `series_key` (a hash) and files by
relative path, never patient data.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np

from site_app.dicom_headers import SliceHeader
from site_app.geometry import slice_normal
from site_app.quarantine import QuarantineReason

ORIENTATION_TOLERANCE = 1e-3
"""Largest difference between direction cosines still read as the same orientation."""
POSITION_TOLERANCE_MM = 0.01
"""Slices closer than this along the normal (or within the plane) are at the same position."""
SPACING_RELATIVE_TOLERANCE = 0.01
"""A slice step may differ from the series' typical step by 1 % (or POSITION_TOLERANCE_MM)."""


def series_key(series_instance_uid: str) -> str:
    """Opaque name of a series for logs and reports: ``"s-"`` + 12 hex digits of sha256(UID)."""
    return "s-" + hashlib.sha256(series_instance_uid.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class SeriesProblem:
    """One reason a series cannot be used, with a plain-language ``detail`` (no patient data)."""

    reason: QuarantineReason
    detail: str


@dataclass(frozen=True)
class SeriesGeometry:
    """Geometry of a validated series. Slices ascend along the normal (row cosine x column cosine).

    ``spacing_mm`` is (row spacing, column spacing, slice spacing); ``origin_mm`` is the
    ImagePositionPatient of the first slice in that order.
    """

    slices: tuple[SliceHeader, ...]
    spacing_mm: tuple[float, float, float]
    orientation: tuple[float, ...]
    origin_mm: tuple[float, float, float]


# --- grouping ----------------------------------------------------------------------------------


def group_by_series(headers: Iterable[SliceHeader]) -> dict[str, list[SliceHeader]]:
    """Headers grouped by SeriesInstanceUID, each group sorted by path; groups in a stable order."""
    groups: dict[str, list[SliceHeader]] = defaultdict(list)
    for header in headers:
        groups[header.series_uid].append(header)
    return {
        uid: sorted(group, key=lambda h: h.path)
        for uid, group in sorted(groups.items(), key=lambda item: series_key(item[0]))
    }


def series_folder(paths: Iterable[str]) -> str:
    """The deepest folder (relative POSIX path) holding all ``paths``; ``"."`` for the root."""
    parents = [str(PurePosixPath(p).parent) for p in paths]
    common = os.path.commonpath(parents) if parents else ""
    return common or "."


def split_identical_copies(
    headers: Sequence[SliceHeader],
) -> tuple[list[SliceHeader], list[tuple[SliceHeader, SliceHeader]]]:
    """Separate byte-identical copies of one file (same content digest).

    Returns ``(kept, copies)`` where ``kept`` holds the first file of each content (by path) and
    ``copies`` pairs each extra copy with the file it duplicates. A copy carries no extra
    information, so it is set aside without spoiling the series.
    """
    first_by_digest: dict[str, SliceHeader] = {}
    kept, copies = [], []
    for header in sorted(headers, key=lambda h: h.path):
        original = first_by_digest.setdefault(header.digest, header)
        if original is header:
            kept.append(header)
        else:
            copies.append((header, original))
    return kept, copies


# --- pure checks -------------------------------------------------------------------------------


def _examples(paths: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def series_problems(headers: Sequence[SliceHeader]) -> list[SeriesProblem]:
    """Every problem that stops ``headers`` (one single-frame image series) forming a volume.

    Checks, in order: geometry present and well formed; Rows/Columns/PixelSpacing/
    FrameOfReferenceUID/patient/SOP class identical; SOPInstanceUIDs unique; one orientation;
    slices on one line along the normal, at distinct positions, uniformly spaced without gaps.
    Position checks are skipped when geometry, orientation or SOPInstanceUIDs already failed
    (they would only repeat the same fault). An empty list means the series is usable.
    """
    problems = _missing_geometry(headers)
    geometry_present = not problems
    problems += _mixed_attributes(headers)
    duplicates = _duplicate_instances(headers)
    problems += duplicates
    if geometry_present:
        orientation_problems = _orientation_problems(headers)
        problems += orientation_problems
        if not orientation_problems and not duplicates:
            problems += _position_problems(headers)
    return problems


def _missing_geometry(headers: Sequence[SliceHeader]) -> list[SeriesProblem]:
    fields = {
        "ImagePositionPatient": lambda h: h.position_mm,
        "ImageOrientationPatient": lambda h: h.orientation,
        "PixelSpacing": lambda h: h.pixel_spacing_mm,
        "Rows/Columns": lambda h: h.rows and h.columns,
    }
    problems = []
    for name, get in fields.items():
        lacking = [h.path for h in headers if not get(h)]
        if lacking:
            problems.append(
                SeriesProblem(
                    QuarantineReason.MISSING_GEOMETRY,
                    f"{name} missing or malformed in {len(lacking)} of {len(headers)} files "
                    f"({_examples(lacking)}); without it the slices cannot be placed in space: "
                    "re-export the series from the scanner/PACS with full geometry",
                )
            )
    malformed = [h.path for h in headers if h.orientation and not _is_orthonormal(h.orientation)]
    if malformed:
        problems.append(
            SeriesProblem(
                QuarantineReason.MISSING_GEOMETRY,
                f"ImageOrientationPatient is not two perpendicular unit vectors in "
                f"{len(malformed)} files ({_examples(malformed)}); re-export the series",
            )
        )
    return problems


def _is_orthonormal(orientation: Sequence[float]) -> bool:
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    return (
        abs(np.linalg.norm(row) - 1) <= ORIENTATION_TOLERANCE
        and abs(np.linalg.norm(col) - 1) <= ORIENTATION_TOLERANCE
        and abs(float(row @ col)) <= ORIENTATION_TOLERANCE
    )


def _mixed_attributes(headers: Sequence[SliceHeader]) -> list[SeriesProblem]:
    attributes = {
        "SOP class": lambda h: h.sop_class_uid,
        "Rows/Columns": lambda h: (h.rows, h.columns),
        "PixelSpacing": lambda h: h.pixel_spacing_mm,
        "FrameOfReferenceUID": lambda h: h.frame_of_reference_uid,
        "PatientID": lambda h: h.patient_key,
    }
    problems = []
    for name, get in attributes.items():
        # A missing value is reported by _missing_geometry, not as a disagreement.
        present = [h for h in headers if get(h) is not None and None not in _as_tuple(get(h))]
        values = Counter(get(h) for h in present)
        if len(values) > 1:
            common = values.most_common(1)[0][0]
            odd = [h.path for h in present if get(h) != common]
            problems.append(
                SeriesProblem(
                    QuarantineReason.MIXED_SERIES,
                    f"files under one SeriesInstanceUID disagree on {name} ({len(values)} "
                    f"different values; e.g. {_examples(odd)} differ from the rest): they are not "
                    "one volume; re-export the series, or move the odd files out",
                )
            )
    return problems


def _as_tuple(value: object) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def _duplicate_instances(headers: Sequence[SliceHeader]) -> list[SeriesProblem]:
    by_uid: dict[str, list[str]] = defaultdict(list)
    for header in headers:
        by_uid[header.sop_instance_uid].append(header.path)
    clashes = [paths for paths in by_uid.values() if len(paths) > 1]
    if not clashes:
        return []
    return [
        SeriesProblem(
            QuarantineReason.DUPLICATE_INSTANCE,
            f"{len(clashes)} SOPInstanceUID(s) appear in more than one file with different "
            f"content (e.g. {_examples(clashes[0])}); it is unclear which copy is right: keep "
            "one copy of each and re-run",
        )
    ]


def _orientation_problems(headers: Sequence[SliceHeader]) -> list[SeriesProblem]:
    reference = np.asarray(headers[0].orientation)
    odd = [
        h.path
        for h in headers
        if np.max(np.abs(np.asarray(h.orientation) - reference)) > ORIENTATION_TOLERANCE
    ]
    if not odd:
        return []
    return [
        SeriesProblem(
            QuarantineReason.MIXED_ORIENTATION,
            f"{len(odd)} of {len(headers)} files have a different ImageOrientationPatient than "
            f"{headers[0].path} (e.g. {_examples(odd)}); a volume needs one orientation: "
            "re-export the series or separate the differently oriented slices",
        )
    ]


def _distance_along_normal(header: SliceHeader, normal: np.ndarray) -> float:
    return float(np.asarray(header.position_mm) @ normal)


def _position_problems(headers: Sequence[SliceHeader]) -> list[SeriesProblem]:
    """Positions along the normal: distinct, on one line, uniformly spaced, no gaps."""
    normal = slice_normal(headers[0].orientation)  # type: ignore[arg-type]
    ordered = sorted(headers, key=lambda h: (_distance_along_normal(h, normal), h.path))
    if len(ordered) < 2:
        return [
            SeriesProblem(
                QuarantineReason.MISSING_SLICES,
                "only 1 slice; a volume needs at least 2 (the rest of the series may not have "
                "been exported)",
            )
        ]
    z = np.array([_distance_along_normal(h, normal) for h in ordered])
    problems = []

    same_place = [
        (ordered[i].path, ordered[i + 1].path)
        for i in range(len(z) - 1)
        if z[i + 1] - z[i] < POSITION_TOLERANCE_MM
    ]
    if same_place:
        problems.append(
            SeriesProblem(
                QuarantineReason.DUPLICATE_INSTANCE,
                f"{len(same_place)} pair(s) of different slices share one position (e.g. "
                f"{' and '.join(same_place[0])}); the series holds two acquisitions or a "
                "re-sent slice: keep one slice per position",
            )
        )
        return problems

    origin = np.asarray(ordered[0].position_mm)
    offsets = [
        float(np.linalg.norm((np.asarray(h.position_mm) - origin) - (zi - z[0]) * normal))
        for h, zi in zip(ordered, z, strict=True)
    ]
    sheared = [h.path for h, off in zip(ordered, offsets, strict=True) if off > 0.1]
    if sheared:
        problems.append(
            SeriesProblem(
                QuarantineReason.MIXED_ORIENTATION,
                f"{len(sheared)} slices are shifted within the image plane relative to the first "
                f"(e.g. {_examples(sheared)}): a tilted-gantry or sheared stack; resample it to "
                "a regular grid before use",
            )
        )

    steps = np.diff(z)
    typical = float(np.median(steps))
    tolerance = max(POSITION_TOLERANCE_MM, SPACING_RELATIVE_TOLERANCE * typical)
    gaps, irregular = [], []
    for i, step in enumerate(steps):
        if abs(step - typical) <= tolerance:
            continue
        multiple = round(step / typical)
        where = f"between positions {z[i]:.2f} mm and {z[i + 1]:.2f} mm"
        if multiple >= 2 and abs(step - multiple * typical) <= tolerance * multiple:
            gaps.append(f"gap of {multiple - 1} slice(s) {where}")
        else:
            irregular.append(f"step of {step:.2f} mm {where}")
    if gaps or irregular:
        found = gaps + irregular
        problems.append(
            SeriesProblem(
                QuarantineReason.MISSING_SLICES,
                f"slice spacing is not uniform (expected {typical:.2f} mm): "
                f"{'; '.join(found[:3])}{f' and {len(found) - 3} more' if len(found) > 3 else ''}"
                "; export the complete series (missing files?) and re-run",
            )
        )
    return problems


def series_geometry(headers: Sequence[SliceHeader]) -> SeriesGeometry:
    """Order the slices of a series that passed `series_problems` and describe its geometry."""
    orientation = headers[0].orientation
    assert orientation is not None and headers[0].pixel_spacing_mm is not None
    normal = slice_normal(orientation)
    ordered = sorted(headers, key=lambda h: (_distance_along_normal(h, normal), h.path))
    z = np.array([_distance_along_normal(h, normal) for h in ordered])
    row_spacing, col_spacing = headers[0].pixel_spacing_mm
    return SeriesGeometry(
        slices=tuple(ordered),
        spacing_mm=(float(row_spacing), float(col_spacing), float(np.median(np.diff(z)))),
        orientation=tuple(float(v) for v in orientation),
        origin_mm=tuple(float(v) for v in ordered[0].position_mm),  # type: ignore[arg-type, union-attr]
    )
