"""DICOM header reading, grouping into series, and pure geometry/consistency checks on headers.

`read_header` is the only I/O here; the checks take `SliceHeader`s and return every problem found,
each naming the series by `series_key` (a hash) and files by relative path, never patient data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path, PurePosixPath

import numpy as np
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels.utils import as_pixel_options
from pydicom.uid import UID, CTImageStorage, DeflatedExplicitVRLittleEndian, MRImageStorage

from site_app.quarantine import QuarantineEntry, QuarantineReason

SEGMENTATION_SOP_CLASSES = frozenset(
    {"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"}  # SEG, Label Map SEG
)
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# Objects that must carry a SeriesInstanceUID to be used: without one they are broken, not foreign.
_SERIES_SOP_CLASSES = frozenset({CTImageStorage, MRImageStorage, *SEGMENTATION_SOP_CLASSES})
_UNDEFINED_LENGTH = 0xFFFFFFFF
_ELEMENT_HEADER_BYTES = 8  # tag + VR + length, short form
_PREAMBLE_END = 132  # 128-byte preamble + b"DICM"
_PIXEL_DATA = 0x7FE00010
_EXTENDED_OFFSET_TABLE = 0x7FE00001

ORIENTATION_TOLERANCE = 1e-3
"""Largest difference between direction cosines still read as the same orientation."""
POSITION_TOLERANCE_MM = 0.01
"""Slices closer than this along the normal (or within the plane) are at the same position."""
SPACING_RELATIVE_TOLERANCE = 0.01
"""A slice step may differ from the series' typical step by 1 % (or POSITION_TOLERANCE_MM)."""


def series_key(series_instance_uid: str) -> str:
    """Opaque name of a series for logs and reports: ``"s-"`` + 12 hex digits of sha256(UID)."""
    return "s-" + hashlib.sha256(series_instance_uid.encode()).hexdigest()[:12]


def patient_key(patient_id: str) -> str:
    """Local pseudonym of a patient: ``"p-"`` + 12 hex digits of sha256(PatientID).

    It is unsalted, so anyone holding the site's patient list can reverse it: like the PatientID
    itself it must never leave the site (the FLARE client sends only counts and model updates).
    """
    return "p-" + hashlib.sha256(patient_id.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class PixelLayout:
    """Where a file's Pixel Data value lies and how to decode it without parsing the file again.

    ``offset`` and ``length`` locate the value (native pixels, or the encapsulated fragments) in
    the file's bytes; ``options`` are the Image Pixel values as ``pydicom.pixels.as_pixel_options``
    gives them (rows, columns, bits, samples, photometric interpretation, frames) and the Pixel
    Data VR, as (name, value) pairs.
    """

    offset: int
    length: int
    options: tuple[tuple[str, int | str], ...]


@dataclass(frozen=True)
class SliceHeader:
    """What ingestion keeps of one DICOM file's header (no names, IDs or dates).

    Geometry fields are ``None`` when the attribute is missing or malformed. ``position_mm`` is
    ImagePositionPatient (x, y, z) in mm; ``orientation`` the 6 ImageOrientationPatient cosines;
    ``pixel_spacing_mm`` is (row spacing, column spacing) in mm. ``rescale`` is (RescaleSlope,
    RescaleIntercept), HU = stored * slope + intercept; (1, 0) when absent, None when present but
    not a number. ``pixel_layout`` locates the Pixel Data (None when it cannot be located, e.g.
    in a deflated file). ``stamp`` is (size in bytes, modification time in ns) when the file was
    read, to notice a file rewritten before it is decoded. UIDs are kept in memory only, to group
    and pair files; they are never logged.
    """

    path: str
    digest: str
    sop_class_uid: str
    modality: str
    series_uid: str
    sop_instance_uid: str
    patient_key: str
    has_pixel_data: bool
    rows: int | None = None
    columns: int | None = None
    position_mm: tuple[float, float, float] | None = None
    orientation: tuple[float, ...] | None = None
    pixel_spacing_mm: tuple[float, float] | None = None
    frame_of_reference_uid: str | None = None
    sex: str | None = None
    age_years: int | None = None
    manufacturer: str | None = None
    slice_thickness_mm: float | None = None
    referenced_series_uids: tuple[str, ...] = ()
    transfer_syntax_uid: str = ""
    rescale: tuple[float, float] | None = (1.0, 0.0)
    pixel_layout: PixelLayout | None = None
    stamp: tuple[int, int] | None = None

    @property
    def is_segmentation(self) -> bool:
        return self.sop_class_uid in SEGMENTATION_SOP_CLASSES or self.modality == "SEG"


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


# --- reading (the only I/O in this module) ---------------------------------------------------


def read_header(
    path: Path, root: Path, known: Mapping[str, SliceHeader] | None = None
) -> SliceHeader | QuarantineEntry:
    """Read one file's header (and its bytes, once, for the content digest).

    Returns a `QuarantineEntry` instead of raising when the file is not DICOM, cannot be read,
    is cut short, or lacks the identifiers needed to group it. Files without the 128-byte
    preamble and ``DICM`` marker are not parsed (they are ``not_dicom``): forcing a parse of
    arbitrary files yields garbage datasets, and preamble-less DICOM is rare on disk.
    ``known`` maps content digests (sha256 hex) to headers read before, e.g. from a cache: a
    file whose bytes hash to one of them is not parsed again (only its path is updated).
    """
    rel = path.relative_to(root).as_posix()
    try:
        with path.open("rb") as handle:
            head = handle.read(_PREAMBLE_END)
            if len(head) < _PREAMBLE_END or head[128:132] != b"DICM":
                return QuarantineEntry(
                    rel,
                    QuarantineReason.NOT_DICOM,
                    "not a DICOM Part 10 file (no 'DICM' marker after the 128-byte preamble); "
                    "remove it from the data folder, or re-export it from PACS as a DICOM file "
                    "if it is a raw DICOM stream",
                )
            stat = os.fstat(handle.fileno())
            data = head + handle.read()
    except OSError as exc:
        return QuarantineEntry(
            rel,
            QuarantineReason.TRUNCATED,
            f"could not be read ({type(exc).__name__}); check that the file is complete and "
            "readable by the fedseg user",
        )
    digest = hashlib.sha256(data).hexdigest()
    stamp = (stat.st_size, stat.st_mtime_ns)
    if known is not None and digest in known:
        return dataclasses.replace(known[digest], path=rel, digest=digest, stamp=stamp)
    try:
        dataset = dcmread(BytesIO(data))
        truncated = _is_truncated(dataset, len(data))
    except Exception as exc:  # pydicom raises many types on corrupt input
        return QuarantineEntry(
            rel,
            QuarantineReason.TRUNCATED,
            f"has a DICOM marker but its header could not be parsed ({type(exc).__name__}); "
            "the file is cut short or corrupt: copy it again from the source",
        )
    if truncated:
        return QuarantineEntry(
            rel,
            QuarantineReason.TRUNCATED,
            "the file ends before the data its header announces (cut short during copy?); "
            "copy it again from the source",
        )
    try:
        return _header_from_dataset(dataset, rel, digest, stamp)
    except Exception as exc:
        return QuarantineEntry(
            rel,
            QuarantineReason.TRUNCATED,
            f"header values could not be decoded ({type(exc).__name__}); the file is corrupt: "
            "copy it again from the source",
        )


def _is_truncated(dataset: Dataset, size: int) -> bool:
    """True when the file ends inside an element: pydicom silently keeps a value cut short, and
    silently stops at a partial element header. (A file cut exactly between two elements is caught
    later, as an object without its identifiers or Pixel Data.)"""
    end = 0
    # keys(), not iteration: iterating a Dataset converts every raw element (and yields elements)
    for tag in dataset.keys():  # noqa: SIM118
        raw = dataset.get_item(tag)
        if not isinstance(raw, RawDataElement) or raw.length == _UNDEFINED_LENGTH:
            continue
        if isinstance(raw.value, bytes) and len(raw.value) < raw.length:
            return True
        end = max(end, raw.value_tell + raw.length)
    inflated = dataset.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
    return not inflated and 0 < size - end < _ELEMENT_HEADER_BYTES


def _header_from_dataset(
    ds: Dataset, rel: str, digest: str, stamp: tuple[int, int] | None = None
) -> SliceHeader | QuarantineEntry:
    sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
    if sop_class == DICOMDIR_SOP_CLASS:
        return QuarantineEntry(
            rel,
            QuarantineReason.UNSUPPORTED_MODALITY,
            "a DICOMDIR index file, not an image; it is ignored (the images it lists are read "
            "directly from the folder)",
        )
    missing = [k for k in ("SOPClassUID", "SeriesInstanceUID", "SOPInstanceUID") if not ds.get(k)]
    if missing == ["SeriesInstanceUID"] and sop_class not in _SERIES_SOP_CLASSES:
        # Some stored objects (colour palettes, hanging protocols, ...) belong to no series.
        return QuarantineEntry(
            rel,
            QuarantineReason.UNSUPPORTED_MODALITY,
            f"a {_sop_class_name(sop_class)} object without a SeriesInstanceUID; fedseg does not "
            "use this kind of object (nothing to do)",
        )
    if missing:
        # Every stored image object carries these; without them the file was cut short between
        # elements or is broken beyond use.
        return QuarantineEntry(
            rel,
            QuarantineReason.TRUNCATED,
            f"has no {', '.join(missing)}, which every DICOM image object carries: the file is "
            "cut short, broken, or a fragment that is not an image; copy it again from the "
            "source if it should be one",
        )
    referenced = tuple(
        str(item.SeriesInstanceUID)
        for item in ds.get("ReferencedSeriesSequence", [])
        if item.get("SeriesInstanceUID")
    )
    spacing = _floats(ds, "PixelSpacing", 2)
    return SliceHeader(
        path=rel,
        digest=digest,
        sop_class_uid=sop_class,
        modality=str(ds.get("Modality", "") or ""),
        series_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        patient_key=patient_key(str(ds.get("PatientID", "") or "")),
        has_pixel_data="PixelData" in ds,
        rows=_positive_int(ds.get("Rows")),
        columns=_positive_int(ds.get("Columns")),
        position_mm=_floats(ds, "ImagePositionPatient", 3),  # type: ignore[arg-type]
        orientation=_floats(ds, "ImageOrientationPatient", 6),
        pixel_spacing_mm=spacing if spacing and min(spacing) > 0 else None,  # type: ignore[arg-type]
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "") or "") or None,
        sex=_sex(ds.get("PatientSex")),
        age_years=parse_age(str(ds.get("PatientAge", "") or "")),
        manufacturer=str(ds.get("Manufacturer", "") or "").strip() or None,
        slice_thickness_mm=_optional_float(ds.get("SliceThickness")),
        referenced_series_uids=referenced,
        transfer_syntax_uid=str(ds.file_meta.get("TransferSyntaxUID", "") or ""),
        rescale=_rescale(ds),
        pixel_layout=pixel_layout(ds),
        stamp=stamp,
    )


def pixel_layout(ds: Dataset) -> PixelLayout | None:
    """Where ``ds`` (read from a whole file's bytes) keeps its Pixel Data, for decoding it later
    from those bytes alone; None when there is none, it was already converted, or its offsets
    do not refer to the file's bytes (deflated files) or need extra tables (extended offsets)."""
    raw = ds.get_item(_PIXEL_DATA)
    inflated = ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
    if (
        not isinstance(raw, RawDataElement)
        or not isinstance(raw.value, bytes)
        or inflated
        or _EXTENDED_OFFSET_TABLE in ds
    ):
        return None
    try:
        options = as_pixel_options(ds)
    except Exception:  # malformed Image Pixel values: decoding will say so
        return None
    if isinstance(raw.VR, str):  # big endian 8-bit OW data is byte-swapped by the decoder
        options["pixel_vr"] = raw.VR
    return PixelLayout(
        offset=int(raw.value_tell),
        length=len(raw.value),
        options=tuple(
            (name, value if isinstance(value, str) else int(value))
            for name, value in sorted(options.items())
        ),
    )


def _rescale(ds: Dataset) -> tuple[float, float] | None:
    """(RescaleSlope, RescaleIntercept); (1, 0) for what is absent; None if one is malformed."""
    values = []
    for keyword, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        value = ds.get(keyword)
        if value is None or value == "":
            values.append(default)
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            return None
        if not math.isfinite(number):
            return None
        values.append(number)
    return (values[0], values[1])


def _sop_class_name(sop_class: str) -> str:
    name = UID(sop_class).name
    return name if name != sop_class else "non-image (unknown SOP class)"


def _floats(ds: Dataset, keyword: str, count: int) -> tuple[float, ...] | None:
    value = ds.get(keyword)
    if value is None:
        return None
    try:
        many = isinstance(value, Sequence) and not isinstance(value, str | bytes)
        numbers = tuple(float(v) for v in (value if many else [value]))
    except (TypeError, ValueError):
        return None
    if len(numbers) != count or not all(math.isfinite(v) for v in numbers):
        return None
    return numbers


def _positive_int(value: object) -> int | None:
    try:
        number = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def _optional_float(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _sex(value: object) -> str | None:
    text = str(value or "").strip().upper()
    return text if text in {"M", "F", "O"} else None


_AGE = re.compile(r"^(\d{3})([DWMY])$")
_DAYS_PER_UNIT = {"D": 1, "W": 7, "M": 365.25 / 12, "Y": 365.25}


def parse_age(value: str) -> int | None:
    """PatientAge (``"045Y"``, ``"006M"``, ``"010W"``, ``"003D"``) in whole years; None if absent
    or malformed."""
    match = _AGE.match(value.strip())
    if not match:
        return None
    amount, unit = int(match.group(1)), match.group(2)
    return amount if unit == "Y" else int(amount * _DAYS_PER_UNIT[unit] // 365.25)


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


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal of the image plane: row cosine x column cosine, shape (3,)."""
    normal = np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:]))
    return normal / np.linalg.norm(normal)


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
