"""What a PACS import fetches and where each file goes: the server's UIDs checked, and the plan.

Pure: no I/O. Every UID the server sends is checked against the DICOM UID grammar
(`is_dicom_uid`) before it can reach a URL or a file name; what passes becomes an `InstanceRef`
(study, series, SOP instance UIDs), whose place under the data folder is made of hashes of
them (``st-<12 hex>/s-<ingestion's series key>/i-<16 hex>.dcm``), so no UID is ever a path.
`plan_fetches` groups what is not on disk yet by series.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from pydicom.uid import RE_VALID_UID

from site_app.dicom_series import series_key
from site_app.pacs_errors import PacsImportError

__all__ = [
    "MAX_UID_LENGTH",
    "FetchBatch",
    "InstanceRef",
    "instance_key",
    "instances_from_search",
    "is_dicom_uid",
    "json_value",
    "plan_fetches",
    "study_key",
    "study_modalities",
    "study_uids_from_search",
]


MAX_UID_LENGTH = 64


def is_dicom_uid(value: object) -> bool:
    """The DICOM UID grammar (PS3.5 9.1): digits in dot-separated components, no leading zero in
    a component other than "0" itself, at most 64 characters."""
    return (
        isinstance(value, str)
        and len(value) <= MAX_UID_LENGTH
        and RE_VALID_UID.fullmatch(value) is not None
    )


def _server_uid(value: str | None, field: str, doing: str) -> str:
    """``value`` if it is a DICOM UID; the server's value is never shown (it may be one)."""
    if value is None:
        raise PacsImportError(
            f"the server's {doing} returned a result without {field}, which QIDO-RS requires; the "
            "server is not a conformant DICOMweb service (check the URL, or ask the PACS vendor)"
        )
    if not is_dicom_uid(value):
        raise PacsImportError(
            f"the server's {doing} returned a {field} that is not a DICOM UID (expected digits "
            f"and dots, at most {MAX_UID_LENGTH} characters, no leading zeros; got "
            f"{len(value)} characters, not shown): refused before it reached a URL or a file "
            "name, and nothing was fetched. A conformant PACS never sends this: check that "
            "--dicomweb points at the hospital's PACS and tell its administrator"
        )
    return value


def study_key(study_instance_uid: str) -> str:
    """Opaque folder name of a study: ``"st-"`` + 12 hex digits of sha256(UID)."""
    return "st-" + hashlib.sha256(study_instance_uid.encode()).hexdigest()[:12]


def instance_key(sop_instance_uid: str) -> str:
    """Opaque file stem of an instance: ``"i-"`` + 16 hex digits of sha256(UID)."""
    return "i-" + hashlib.sha256(sop_instance_uid.encode()).hexdigest()[:16]


@dataclass(frozen=True, order=True)
class InstanceRef:
    """One DICOM instance on the server, by its three UIDs (kept in memory, never logged)."""

    study_uid: str
    series_uid: str
    sop_uid: str

    @property
    def relative_path(self) -> PurePosixPath:
        """Where the instance goes under the data folder: ``st-…/s-…/i-….dcm`` (hashes of the
        study, series and SOP instance UIDs; the series folder is ingestion's `series_key`)."""
        return PurePosixPath(
            study_key(self.study_uid), series_key(self.series_uid), instance_key(self.sop_uid)
        ).with_suffix(".dcm")


@dataclass(frozen=True)
class FetchBatch:
    """Instances of one series still to fetch. ``whole_series``: none of the series is on disk
    yet, so one WADO-RS series request fetches them all (one request instead of one each)."""

    study_uid: str
    series_uid: str
    refs: tuple[InstanceRef, ...]
    whole_series: bool


def instances_from_search(results: Iterable[Mapping], study_uid: str) -> list[InstanceRef]:
    """The instances of a QIDO-RS instance search (DICOM JSON) within one study, sorted.

    Raises:
        PacsImportError: a result lacks SeriesInstanceUID or SOPInstanceUID, or one of them is
            not a DICOM UID.
    """
    doing = "instance search"
    refs = set()
    for result in results:
        series_uid = _server_uid(json_value(result, "0020000E"), "SeriesInstanceUID", doing)
        sop_uid = _server_uid(json_value(result, "00080018"), "SOPInstanceUID", doing)
        refs.add(InstanceRef(study_uid, series_uid, sop_uid))
    return sorted(refs)


def study_uids_from_search(results: Iterable[Mapping]) -> list[str]:
    """The StudyInstanceUIDs of a QIDO-RS study search (DICOM JSON), sorted and unique.

    Raises:
        PacsImportError: a result's StudyInstanceUID is not a DICOM UID.
    """
    uids = {json_value(result, "0020000D") for result in results}
    uids.discard(None)
    return sorted(_server_uid(uid, "StudyInstanceUID", "study search") for uid in uids)


def study_modalities(result: Mapping) -> frozenset[str] | None:
    """ModalitiesInStudy of a QIDO-RS study result, or None when the server left it out."""
    element = result.get("00080061")
    values = element.get("Value") if isinstance(element, Mapping) else None
    return frozenset(str(value) for value in values) if isinstance(values, list) else None


def plan_fetches(refs: Sequence[InstanceRef], present: set[InstanceRef]) -> list[FetchBatch]:
    """Group the instances not yet ``present`` by series, in sorted order."""
    by_series: dict[tuple[str, str], list[InstanceRef]] = defaultdict(list)
    for ref in sorted(refs):
        by_series[(ref.study_uid, ref.series_uid)].append(ref)
    batches = []
    for (study_uid, series_uid), series_refs in by_series.items():
        missing = tuple(ref for ref in series_refs if ref not in present)
        if missing:
            whole = len(missing) == len(series_refs)
            batches.append(FetchBatch(study_uid, series_uid, missing, whole))
    return batches


def json_value(result: object, tag: str) -> str | None:
    """The first value under ``tag`` of a DICOM JSON result when it is a string, else None
    (including for results that are not DICOM JSON objects at all)."""
    element = result.get(tag) if isinstance(result, Mapping) else None
    values = element.get("Value") if isinstance(element, Mapping) else None
    if isinstance(values, list) and values and isinstance(values[0], str):
        return values[0]
    return None
