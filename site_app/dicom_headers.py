"""One DICOM file's header as ingestion keeps it: read once, hashed, parsed into a `SliceHeader`.

`read_header` is the only I/O here: it reads a file's bytes once (for the sha256 content digest
that names it in the cache), parses the header with pydicom and keeps what grouping, validation
and decoding need (UIDs, geometry in mm, rescale, where the Pixel Data lies), never names, IDs
or dates. A file that cannot be used becomes a `QuarantineEntry` instead of an exception.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

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


# --- reading (the only I/O in this module) -------------------------------------------------


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
