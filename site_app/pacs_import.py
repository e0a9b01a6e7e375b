"""Import studies from a PACS over DICOMweb (QIDO-RS search, WADO-RS retrieve) into a data folder.

The plan (what to fetch, where each instance goes) is pure; HTTP (searches through
dicomweb-client, retrieval read part by part here) and atomic file writes sit at the edges.
Folder and file names are hashes of UIDs, and nothing here logs a UID, a patient name or ID: log
lines and errors carry counts, hashes and the server URL.

The server is not trusted: every UID it sends must follow the DICOM UID grammar before it goes
into a URL, and what one run accepts is capped (`ImportLimits`): search pages, listed instances,
bytes of a search answer, of one instance and of the whole run, and the decompressed size of an
instance. Past a cap the run stops with an error naming it; files written before stay.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import re
import time
import warnings
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path, PurePosixPath
from typing import TypeVar
from urllib.parse import urlsplit

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.filereader import read_dataset
from pydicom.uid import RE_VALID_UID, DeflatedExplicitVRLittleEndian
from requests.adapters import HTTPAdapter
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from jobs.atomic_files import atomic_write
from site_app.dicom_headers import SliceHeader, read_header
from site_app.dicom_series import series_key

__all__ = [
    "DicomwebSource",
    "ImportLimits",
    "ImportSummary",
    "InstanceRef",
    "PacsImportError",
    "StudySelection",
    "import_from_dicomweb",
    "is_dicom_uid",
    "journal_path",
    "limit_flags",
    "plan_fetches",
]

logger = logging.getLogger(__name__)

JOURNAL_SUFFIX = ".fedseg-import.jsonl"
"""The journal sits beside the data folder (``<out>`` + this), not in it: ingestion reads every
file under the data folder, and a JSON file there would be quarantined as not DICOM."""
PARTIAL_PREFIX = ".fedseg-partial-"
"""Name prefix of a file still being written; only ever renamed into place once complete."""
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
"""WADO-RS Accept header: every transfer syntax, so the server sends files as stored (no
transcoding) and the bytes on disk are the PACS's own."""
CONNECT_TIMEOUT_S = 10.0
MAX_UID_LENGTH = 64
MAX_SEARCH_PAGES = 1_000
"""Pages of one QIDO-RS search (a PACS answers ~100 results a page: 100,000 studies)."""
MAX_LISTED_INSTANCES = 500_000
"""Instances the selected studies may list in one run (~1,000 CT studies)."""
MAX_SEARCH_ANSWER_BYTES = 64 << 20
"""Bytes of one search answer (DICOM JSON), after HTTP content decoding."""
MAX_INSTANCE_BYTES = 1 << 30
"""Bytes of one instance as the server sends it."""
MAX_DECOMPRESSED_BYTES = 2 << 30
"""Decompressed size of one instance: its pixel data as declared (rows x columns x frames x
samples x bits), or its whole dataset once inflated (deflated transfer syntax)."""
MAX_RUN_BYTES = 500 << 30
"""Bytes received by the retrievals of one run."""
_RETRIES = 4
_RETRY_WAIT_MULTIPLIER_MS = 500
_RETRY_STATUSES = frozenset({408, 429, 503, 504})
_CHUNK_BYTES = 1 << 20
_PART_HEADER_BYTES = 64 << 10
_MODALITY = re.compile(r"^[A-Z0-9_]{1,16}$")
_LOOPBACK_NAMES = frozenset({"localhost"})
_TRANSPORT_LOGGERS = ("dicomweb_client", "urllib3", "retrying", "pydicom")
_T = TypeVar("_T")


class PacsImportError(Exception):
    """The import cannot go on; the message names what failed and what to do (no patient data)."""


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


def _size(count: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if count >= 1 << shift:
            return f"{count / (1 << shift):.3g} {unit}"
    return f"{count} bytes"


# --- configuration (validated once, at the boundary) --------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DicomwebSource:
    """Where and how to reach the PACS's DICOMweb service.

    Args:
        url: the DICOMweb root, e.g. ``https://pacs.example.org/dicom-web`` (for Orthanc
            ``http://HOST:8042/dicom-web``). Must not carry a user or password.
        username: HTTP basic-auth user, or None for a server without login.
        password_env: name of the environment variable holding the password (required with
            ``username``); the password is read once, here, and never stored in this object.
        ca_bundle: PEM file of the CA certificate(s) that signed the server's TLS certificate
            (``https`` only); None trusts the system's CAs.
        timeout_s: seconds to wait for each answer (connecting waits at most 10 s).
        allow_insecure_http: accept ``username`` over plain ``http`` to another machine, where
            basic auth sends the password readable by anyone on the network path (for a link
            protected otherwise, e.g. a VPN). Loopback needs no permission.

    Raises:
        PacsImportError: any of the above is malformed or missing, or basic auth would cross
            the network over plain http without ``allow_insecure_http``.
    """

    url: str
    username: str | None = None
    password_env: str | None = None
    ca_bundle: Path | None = None
    timeout_s: float = 30.0
    allow_insecure_http: bool = False
    _password: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PacsImportError(
                f"--dicomweb {self.url!r}: expected an http:// or https:// URL with a host, e.g. "
                "https://pacs.example.org/dicom-web (for Orthanc: http://HOST:8042/dicom-web)"
            )
        if parts.username or parts.password:
            raise PacsImportError(
                "--dicomweb: the URL carries a user or password; remove it from the URL and pass "
                "--username USER --password-env VAR (the password in environment variable VAR)"
            )
        if parts.query or parts.fragment:
            raise PacsImportError(
                f"--dicomweb {self.url!r}: expected the DICOMweb root without '?' or '#' parts"
            )
        if (self.username is None) != (self.password_env is None):
            raise PacsImportError(
                "--username and --password-env go together: pass both for a server that needs a "
                "login (the password is read from the environment variable named by "
                "--password-env, never from the command line), or neither"
            )
        if self.password_env is not None:
            password = os.environ.get(self.password_env)
            if not password:
                raise PacsImportError(
                    f"--password-env {self.password_env}: that environment variable is not set "
                    f"or empty; set it to the PACS password (e.g. read {self.password_env} from "
                    "a file only this user can read) and run again"
                )
            object.__setattr__(self, "_password", password)
        if self.ca_bundle is not None:
            if parts.scheme != "https":
                raise PacsImportError(
                    "--ca-bundle applies to https:// URLs only; use the server's https URL"
                )
            if not Path(self.ca_bundle).is_file():
                raise PacsImportError(
                    f"--ca-bundle {self.ca_bundle}: file not found; pass the PEM file of the "
                    "CA that signed the PACS's certificate (ask the hospital's IT)"
                )
        if not self.timeout_s > 0:
            raise PacsImportError(f"--timeout: expected seconds > 0, got {self.timeout_s}")
        if self.sends_password_in_clear and not self.allow_insecure_http:
            raise PacsImportError(
                f"--username over {parts.scheme}://{parts.hostname}: refused, because HTTP basic "
                "auth over plain http sends the password in clear (only base64-encoded) across "
                "the network to the PACS; use the PACS's https:// URL (with --ca-bundle if the "
                "hospital's CA signed its certificate), or pass --allow-insecure-http if this "
                "network link is protected otherwise (e.g. a VPN)"
            )

    @property
    def root(self) -> str:
        """The URL without a trailing slash."""
        return self.url.rstrip("/")

    @property
    def sends_password_in_clear(self) -> bool:
        """True for basic auth over plain http to a host other than this machine."""
        parts = urlsplit(self.url)
        return self.username is not None and parts.scheme == "http" and not _is_loopback(parts)


def _is_loopback(parts) -> bool:
    host = parts.hostname or ""
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class StudySelection:
    """Which studies to import: all of them (the default), those listed, and/or those with a
    modality. Whole studies are imported (a CT study's SEG series comes along with it).

    Args:
        study_uids: StudyInstanceUIDs; empty means every study the server lists.
        modality: keep studies whose ModalitiesInStudy holds this code (``CT``, ``MR``...).
    """

    study_uids: tuple[str, ...] = ()
    modality: str | None = None

    def __post_init__(self) -> None:
        for position, uid in enumerate(self.study_uids, start=1):
            if not is_dicom_uid(uid):
                raise PacsImportError(
                    f"--study value number {position} is not a valid DICOM UID (digits and dots, "
                    f"at most {MAX_UID_LENGTH} characters, no leading zeros); copy the "
                    "StudyInstanceUID from the PACS again"
                )
        if self.modality is not None and not _MODALITY.match(self.modality):
            raise PacsImportError(
                f"--modality {self.modality!r}: expected an upper-case DICOM modality code such "
                "as CT or MR"
            )


_LIMIT_FLAGS = {
    "max_search_pages": ("--max-search-pages", 1),
    "max_listed_instances": ("--max-listed-instances", 1),
    "max_search_answer_bytes": ("--max-search-answer-mb", 1 << 20),
    "max_instance_bytes": ("--max-instance-mb", 1 << 20),
    "max_decompressed_bytes": ("--max-decompressed-mb", 1 << 20),
    "max_run_bytes": ("--max-run-gb", 1 << 30),
}
"""Each limit's command-line flag and the unit that flag counts in."""


def limit_flags() -> dict[str, tuple[str, int]]:
    """``ImportLimits`` field -> (command-line flag, bytes per unit of that flag; 1 for counts)."""
    return dict(_LIMIT_FLAGS)


@dataclass(frozen=True, kw_only=True)
class ImportLimits:
    """What one import run accepts from the server. Past any of them the run stops with an
    error naming the limit and its flag; every file written before stays (a rerun resumes).

    Args:
        max_search_pages: pages of one QIDO-RS search (a server answering new results forever).
        max_listed_instances: instances the selected studies may list in one run.
        max_search_answer_bytes: bytes of one search answer, after HTTP content decoding (a
            gzip bomb counts inflated).
        max_instance_bytes: bytes of one instance as received.
        max_decompressed_bytes: an instance's pixel data as declared by its header (rows x
            columns x frames x samples x bits allocated, what decoding it would allocate), or
            its dataset once inflated (deflated transfer syntax); checked before it is parsed
            or written.
        max_run_bytes: bytes the retrievals of one run receive.

    Raises:
        PacsImportError: a limit is not a whole number >= 1.
    """

    max_search_pages: int = MAX_SEARCH_PAGES
    max_listed_instances: int = MAX_LISTED_INSTANCES
    max_search_answer_bytes: int = MAX_SEARCH_ANSWER_BYTES
    max_instance_bytes: int = MAX_INSTANCE_BYTES
    max_decompressed_bytes: int = MAX_DECOMPRESSED_BYTES
    max_run_bytes: int = MAX_RUN_BYTES

    def __post_init__(self) -> None:
        for name, (flag, _) in _LIMIT_FLAGS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PacsImportError(f"{flag}: expected a whole number >= 1, got {value!r}")

    def describe(self, name: str) -> str:
        """``"4 MiB (--max-instance-mb)"``: the limit and the flag that raises it."""
        flag, unit = _LIMIT_FLAGS[name]
        value = getattr(self, name)
        return f"{value if unit == 1 else _size(value)} ({flag})"


# --- the plan (pure) ---------------------------------------------------------------------------


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
        series_uid = _server_uid(_json_value(result, "0020000E"), "SeriesInstanceUID", doing)
        sop_uid = _server_uid(_json_value(result, "00080018"), "SOPInstanceUID", doing)
        refs.add(InstanceRef(study_uid, series_uid, sop_uid))
    return sorted(refs)


def study_uids_from_search(results: Iterable[Mapping]) -> list[str]:
    """The StudyInstanceUIDs of a QIDO-RS study search (DICOM JSON), sorted and unique.

    Raises:
        PacsImportError: a result's StudyInstanceUID is not a DICOM UID.
    """
    uids = {_json_value(result, "0020000D") for result in results}
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


def _json_value(result: object, tag: str) -> str | None:
    """The first value under ``tag`` of a DICOM JSON result when it is a string, else None
    (including for results that are not DICOM JSON objects at all)."""
    element = result.get(tag) if isinstance(result, Mapping) else None
    values = element.get("Value") if isinstance(element, Mapping) else None
    if isinstance(values, list) and values and isinstance(values[0], str):
        return values[0]
    return None


# --- the journal: what was written, with its digest -----------------------------------------------


def journal_path(out_dir: Path) -> Path:
    """The import journal of ``out_dir``: beside it, ``<out_dir name>.fedseg-import.jsonl``."""
    out_dir = Path(out_dir).absolute()
    return out_dir.with_name(out_dir.name + JOURNAL_SUFFIX)


class _Journal:
    """Append-only JSON lines ``{"file": relative path, "sha256": hex}``, one per instance written.
    A line cut short by a crash is ignored (that instance is verified or fetched again)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.digests: dict[str, str] = {}
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    self.digests[str(record["file"])] = str(record["sha256"])
                except (ValueError, KeyError, TypeError):
                    continue

    def record(self, relative: PurePosixPath, digest: str) -> None:
        self.digests[relative.as_posix()] = digest
        line = json.dumps({"file": relative.as_posix(), "sha256": digest}) + "\n"
        # Not fsynced: a line lost in a crash only means that file is verified again next run.
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line)


# --- the import (I/O) -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportSummary:
    """What one run did. ``instances`` counts what the selected studies hold on the server;
    ``already_present`` those found complete on disk; ``fetched`` those written by this run;
    ``remaining`` those left for a later run (``limit`` reached)."""

    out_dir: Path
    journal: Path
    studies: int
    instances: int
    already_present: int
    fetched: int
    remaining: int

    @property
    def complete(self) -> bool:
        return self.remaining == 0


def import_from_dicomweb(
    source: DicomwebSource,
    out_dir: Path,
    *,
    selection: StudySelection | None = None,
    limit: int | None = None,
    limits: ImportLimits | None = None,
    progress: bool = False,
) -> ImportSummary:
    """Copy the selected studies from the PACS into ``out_dir``, resuming a previous run.

    Each instance is written as ``out_dir/st-<study hash>/s-<series hash>/i-<instance hash>.dcm``
    with the bytes the server sends (as stored there, no transcoding), to a temporary name first,
    fsynced, then renamed: an interrupted import leaves whole files only. A run skips the
    instances already on disk (same digest as the journal records, or readable DICOM with the
    right SOPInstanceUID) and fetches the rest. Files are readable by the importing user only.

    Args:
        source: the DICOMweb service and its credentials.
        out_dir: the site's data folder (created with the first file written); files already
            there are kept.
        selection: which studies; None imports every study the server lists.
        limit: fetch at most this many instances in this run (import in batches; a rerun
            continues); None fetches all.
        limits: what the run accepts from the server (default: the module's ``MAX_*``).
        progress: show progress bars (on stderr).

    Raises:
        PacsImportError: the server cannot be reached, refuses the login, is not a DICOMweb
            service, sends a UID that is not one or more than ``limits`` allow, a selected
            study is not there, or ``out_dir`` is not a writable folder.
    """
    selection = selection or StudySelection()
    limits = limits or ImportLimits()
    if limit is not None and limit < 0:
        raise PacsImportError(f"--max-instances: expected a number >= 0, got {limit}")
    out_dir = _require_out_dir(Path(out_dir))
    with _disk_errors(out_dir):
        journal = _Journal(journal_path(out_dir))
        removed = _remove_partial_files(out_dir)
    if removed:
        logger.info("removed %d partial file(s) left by an interrupted import", removed)
    if source.sends_password_in_clear:
        logger.warning(
            "basic auth over plain http sends the PACS password unencrypted; use the server's "
            "https URL (with --ca-bundle if its certificate is signed by the hospital's CA)"
        )

    client = _client(source, limits)
    with _transport_quiet():
        studies = _find_studies(client, source, selection, limits)
        with _bars(progress) as bars:  # shown once the server has answered
            refs = _list_instances(client, source, studies, limits, bars)
            with _disk_errors(out_dir):
                present = _present_on_disk(refs, out_dir, journal)
            batches = plan_fetches(refs, present)
            missing = sum(len(batch.refs) for batch in batches)
            budget = missing if limit is None else min(limit, missing)
            retrieval = _Retrieval(source, limits)
            fetched = _fetch(retrieval, batches, out_dir, journal, budget, bars)

    summary = ImportSummary(
        out_dir=out_dir,
        journal=journal.path,
        studies=len(studies),
        instances=len(refs),
        already_present=len(present),
        fetched=fetched,
        remaining=missing - fetched,
    )
    logger.info(
        "DICOMweb import: %d studies, %d instances listed, %d already present, %d fetched, "
        "%d remaining",
        summary.studies,
        summary.instances,
        summary.already_present,
        summary.fetched,
        summary.remaining,
    )
    return summary


def _list_instances(
    client: DICOMwebClient,
    source: DicomwebSource,
    studies: Sequence[str],
    limits: ImportLimits,
    bars: _Bars,
) -> list[InstanceRef]:
    task = bars.add_task("Listing instances", total=len(studies))
    refs: list[InstanceRef] = []
    for study_uid in studies:
        refs += _find_instances(client, source, study_uid, limits)
        if len(refs) > limits.max_listed_instances:
            raise PacsImportError(
                f"the selected studies list more than "
                f"{limits.describe('max_listed_instances')} instances; nothing was fetched in "
                "this run. Import fewer studies per run (--study, --modality), or raise the "
                "limit if the PACS really holds that many"
            )
        bars.advance(task)
    return refs


def _fetch(
    retrieval: _Retrieval,
    batches: Sequence[FetchBatch],
    out_dir: Path,
    journal: _Journal,
    budget: int,
    bars: _Bars,
) -> int:
    """Fetch up to ``budget`` instances of ``batches`` into ``out_dir``; returns how many.
    Each instance is journaled as soon as it is written, so an error later loses none."""
    task = bars.add_task("Importing instances", total=budget)
    fetched = 0
    for batch in batches:
        if fetched >= budget:
            break
        for ref, data in _take(retrieval.instances(batch), budget - fetched):
            with _disk_errors(out_dir):
                digest = _write_atomically(out_dir / ref.relative_path, data)
                journal.record(ref.relative_path, digest)
            fetched += 1
            bars.advance(task)
    return fetched


def _require_out_dir(out_dir: Path) -> Path:
    if out_dir.exists() and not out_dir.is_dir():
        raise PacsImportError(
            f"--out {out_dir} is a file, not a folder; choose a folder for the site's DICOM"
        )
    return out_dir


def _remove_partial_files(out_dir: Path) -> int:
    """Delete files an earlier, killed run left half written (only our own temporary names)."""
    removed = 0
    for partial in out_dir.rglob(f"{PARTIAL_PREFIX}*"):
        if partial.is_file():
            partial.unlink()
            removed += 1
    return removed


def _session(source: DicomwebSource) -> requests.Session:
    session = requests.Session()
    if source.username is not None:
        session.auth = (source.username, source._password or "")
    if source.ca_bundle is not None:
        session.mount("https://", _TrustingOnly(source.ca_bundle))
    return session


def _timeout(source: DicomwebSource) -> tuple[float, float]:
    return (min(CONNECT_TIMEOUT_S, source.timeout_s), source.timeout_s)


def _client(source: DicomwebSource, limits: ImportLimits) -> DICOMwebClient:
    """dicomweb-client for the searches, every answer capped at ``max_search_answer_bytes``."""
    session = _session(source)

    def cap(response: requests.Response, **_) -> requests.Response:
        response.raw = _CappedBody(response.raw, source, limits)
        return response

    session.hooks["response"].append(cap)
    client = DICOMwebClient(source.root, session=session, timeout=_timeout(source))
    # Searches fail fast (a wrong URL or password is not worth retrying); retrieval retries.
    client.set_http_retry_params(retry=False)
    return client


class _CappedBody:
    """A search answer's body (urllib3's ``raw``) that stops past ``max_search_answer_bytes``.
    requests reads every body through ``raw.stream(decode_content=True)``, so what is counted is
    the decoded size: a gzip bomb counts inflated."""

    def __init__(self, raw, source: DicomwebSource, limits: ImportLimits) -> None:
        self._raw, self._source, self._limits = raw, source, limits

    def stream(self, amt: int = 1 << 16, decode_content: bool | None = None) -> Iterator[bytes]:
        received = 0
        for chunk in self._raw.stream(amt, decode_content=decode_content):
            received += len(chunk)
            if received > self._limits.max_search_answer_bytes:
                self._raw.close()
                raise PacsImportError(
                    f"{self._source.root} sent a search answer larger than "
                    f"{self._limits.describe('max_search_answer_bytes')}; nothing was fetched "
                    "in this run. A PACS pages its answers far below this: check the server, or "
                    "raise the limit"
                )
            yield chunk

    def __getattr__(self, name: str):
        return getattr(self._raw, name)


class _TrustingOnly(HTTPAdapter):
    """Verifies https answers against ``ca_bundle`` only. (``session.verify`` is not enough:
    requests replaces it with ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` when those are set.)"""

    def __init__(self, ca_bundle: Path) -> None:
        super().__init__()
        self._ca_bundle = str(ca_bundle)

    def send(self, request, **kwargs):  # type: ignore[override]
        kwargs["verify"] = self._ca_bundle
        return super().send(request, **kwargs)


def _find_studies(
    client: DICOMwebClient, source: DicomwebSource, selection: StudySelection, limits: ImportLimits
) -> list[str]:
    # The modality is matched here, on each result's ModalitiesInStudy, not sent as a filter:
    # Orthanc 1.10's DICOMweb plugin ignores the paging offset when filtering on it.
    with _http_errors(source, "searching studies", searching=True):
        if selection.study_uids:
            results = [
                _one_study(client, uid, position)
                for position, uid in enumerate(selection.study_uids, start=1)
            ]
        else:
            results = _search_all(
                lambda offset: client.search_for_studies(
                    fields=("ModalitiesInStudy",), offset=offset
                ),
                key="0020000D",
                source=source,
                limits=limits,
            )
    studies = study_uids_from_search(results)  # every UID checked before one reaches a URL
    if selection.modality is None:
        return studies
    kept = []
    for result in results:
        uid = _json_value(result, "0020000D")
        if uid is None:
            continue
        listed = study_modalities(result)
        if listed is None:  # the server did not say: ask for the study's series of that modality
            with _http_errors(source, "searching a study's series"):
                listed = {selection.modality} if _has_series(client, uid, selection) else set()
        if selection.modality in listed:
            kept.append(uid)
        elif selection.study_uids:
            position = selection.study_uids.index(uid) + 1
            raise PacsImportError(
                f"--study value number {position}: the study holds no {selection.modality} "
                "series; leave out --modality or that --study value"
            )
    return sorted(set(kept))


def _one_study(client: DICOMwebClient, uid: str, position: int) -> Mapping:
    results = client.search_for_studies(
        search_filters={"StudyInstanceUID": uid}, fields=("ModalitiesInStudy",)
    )
    for result in results:
        if _json_value(result, "0020000D") == uid:
            return result
    raise PacsImportError(
        f"--study value number {position}: the server lists no such study; check the UID (copy "
        "it from the PACS) and that this user may see the study"
    )


def _has_series(client: DICOMwebClient, study_uid: str | None, selection: StudySelection) -> bool:
    return bool(
        client.search_for_series(
            study_instance_uid=study_uid, search_filters={"Modality": selection.modality}, limit=1
        )
    )


def _find_instances(
    client: DICOMwebClient, source: DicomwebSource, study_uid: str, limits: ImportLimits
) -> list[InstanceRef]:
    with _http_errors(source, "listing a study's instances"):
        results = _search_all(
            lambda offset: client.search_for_instances(
                study_instance_uid=study_uid,
                fields=("SeriesInstanceUID", "SOPInstanceUID"),
                offset=offset,
            ),
            key="00080018",
            source=source,
            limits=limits,
        )
    return instances_from_search(results, study_uid)


def _search_all(
    search: Callable[[int], list[dict]],
    *,
    key: str,
    source: DicomwebSource,
    limits: ImportLimits,
) -> list[dict]:
    """Every result of a QIDO-RS search, page after page (``search(offset)``), told apart by
    the UID under tag ``key``. Stops at the first page with nothing new, as a server that ignores
    the offset answers the same page again (dicomweb-client's ``get_remaining`` loops forever),
    and with an error after ``max_search_pages`` pages (one that always answers new results)."""
    results: list[dict] = []
    seen: set[str | None] = set()
    for _ in range(limits.max_search_pages):
        page = search(len(results))
        new = [result for result in page if _json_value(result, key) not in seen]
        if not new:
            return results
        seen.update(_json_value(result, key) for result in new)
        results += new
    raise PacsImportError(
        f"{source.root} still answered new results after "
        f"{limits.describe('max_search_pages')} pages of one search; nothing was fetched in this "
        "run. Narrow the selection (--study, --modality), or raise the limit if the PACS really "
        "lists that much"
    )


def _present_on_disk(
    refs: Sequence[InstanceRef], out_dir: Path, journal: _Journal
) -> set[InstanceRef]:
    """The instances already complete on disk. A file with the digest the journal recorded is
    the one written and checked then; one not in the journal (or changed since) counts only if it
    reads as DICOM with the expected SOPInstanceUID, and is then recorded."""
    present = set()
    for ref in refs:
        relative = ref.relative_path
        path = out_dir / relative
        if not path.is_file():
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if journal.digests.get(relative.as_posix()) == digest:
            present.add(ref)
        elif _is_complete_instance(path, out_dir, ref.sop_uid):
            journal.record(relative, digest)
            present.add(ref)
    return present


def _is_complete_instance(path: Path, out_dir: Path, sop_uid: str) -> bool:
    """Ingestion's own header check (which catches files cut short), the expected UID, and Pixel
    Data (an object without pixels is fetched once more, then known by its digest)."""
    header = read_header(path, out_dir)
    return (
        isinstance(header, SliceHeader)
        and header.sop_instance_uid == sop_uid
        and header.has_pixel_data
    )


class _Retrieval:
    """WADO-RS retrieval, read part by part here rather than by dicomweb-client, which buffers a
    part of any size and hands it to pydicom (which inflates a deflated dataset of any size):
    each instance is capped in bytes while it arrives, its decompressed size is checked before
    it is parsed, and the run's bytes are counted."""

    def __init__(self, source: DicomwebSource, limits: ImportLimits) -> None:
        self.source, self.limits = source, limits
        self.session = _session(source)
        self.received = 0

    def instances(self, batch: FetchBatch) -> Iterator[tuple[InstanceRef, bytes]]:
        """The batch's instances as (ref, Part 10 bytes as the server sent them): one series
        request when the whole series is wanted, then one request per instance the series
        answer did not hold."""
        received: set[InstanceRef] = set()
        if batch.whole_series:
            with _http_errors(self.source, "retrieving a series"):
                for data in self._parts(batch.study_uid, batch.series_uid, series=batch.series_uid):
                    ref = self._checked(data, batch)
                    if ref is not None and ref not in received:  # others: added after the search
                        received.add(ref)
                        yield ref, data
        for ref in batch.refs:
            if ref not in received:
                with _http_errors(self.source, "retrieving an instance"):
                    parts = self._parts(
                        ref.study_uid, ref.series_uid, ref.sop_uid, series=batch.series_uid
                    )
                    data = next(parts, None)
                    parts.close()
                if data is None or self._checked(data, batch) != ref:
                    raise PacsImportError(
                        f"the server answered a request for an instance of series "
                        f"{series_key(batch.series_uid)} with a different instance (or none); "
                        "the PACS's DICOMweb service is misbehaving (see its log)"
                    )
                yield ref, data

    def _parts(self, *uids: str, series: str) -> Iterator[bytes]:
        levels = ("studies", "series", "instances")[: len(uids)]
        if not all(is_dicom_uid(uid) for uid in uids):  # checked when listed; never in a URL
            raise PacsImportError("internal: a UID that is not one reached a retrieval URL")
        url = self.source.root + "".join(
            f"/{level}/{uid}" for level, uid in zip(levels, uids, strict=True)
        )
        response = self._get(url)
        with response:
            yield from self._split(response, series)

    def _get(self, url: str) -> requests.Response:
        for attempt in range(_RETRIES):
            response = self.session.get(
                url, headers={"Accept": AS_STORED}, stream=True, timeout=_timeout(self.source)
            )
            if response.status_code not in _RETRY_STATUSES or attempt == _RETRIES - 1:
                break
            response.close()
            time.sleep(_RETRY_WAIT_MULTIPLIER_MS / 1000 * 2**attempt)
        if response.status_code >= 400:
            response.close()
            response.raise_for_status()
        return response

    def _chunks(self, response: requests.Response) -> Iterator[bytes]:
        for chunk in response.iter_content(_CHUNK_BYTES):
            self.received += len(chunk)
            if self.received > self.limits.max_run_bytes:
                raise PacsImportError(
                    f"this run received more than {self.limits.describe('max_run_bytes')} from "
                    f"{self.source.root}; it stopped there, and the instances written so far are "
                    "kept: run the same command again to continue, or raise the limit"
                )
            yield chunk

    def _too_large(self, series: str) -> PacsImportError:
        return PacsImportError(
            f"an instance of series {series_key(series)} is larger than "
            f"{self.limits.describe('max_instance_bytes')}; the import stopped before it, and "
            "the instances written so far are kept. Raise the limit if such instances are "
            "expected, or leave that study out (--study)"
        )

    def _split(self, response: requests.Response, series: str) -> Iterator[bytes]:
        """The parts of a multipart/related answer (or the body of a bare application/dicom
        one), each at most ``max_instance_bytes``; the buffer never holds more than one."""
        limit = self.limits.max_instance_bytes
        media_type, _, parameters = response.headers.get("Content-Type", "").partition(";")
        media_type = media_type.strip().lower()
        if media_type == "application/dicom":  # not encapsulated, as some servers answer
            body = bytearray()
            for chunk in self._chunks(response):
                body += chunk
                if len(body) > limit:
                    raise self._too_large(series)
            yield bytes(body)
            return
        boundary = _boundary(parameters) if media_type == "multipart/related" else None
        if boundary is None:
            raise PacsImportError(
                f"{self.source.root} answered a retrieval with {media_type or 'no media type'}, "
                "not multipart/related DICOM; it is not a conformant WADO-RS service"
            )
        delimiter = b"\r\n--" + boundary
        buffer = bytearray(b"\r\n")  # the body opens with a delimiter lacking its line break
        start = 0
        for chunk in self._chunks(response):
            buffer += chunk
            while (index := buffer.find(delimiter, start)) >= 0:
                part = bytes(buffer[:index])
                del buffer[: index + len(delimiter)]
                start = 0
                if part.startswith(b"--"):  # the close delimiter: the rest is epilogue
                    return
                content = _part_content(part)
                if content is not None:
                    yield content
            if len(buffer) > limit + _PART_HEADER_BYTES:
                raise self._too_large(series)
            start = max(0, len(buffer) - len(delimiter) + 1)

    def _checked(self, data: bytes, batch: FetchBatch) -> InstanceRef | None:
        """The instance of ``batch`` that ``data`` is, after the decompressed-size checks; None
        for one the batch does not hold."""
        series = series_key(batch.series_uid)
        if data[128:132] != b"DICM":
            raise PacsImportError(
                f"an instance of series {series} came without a DICOM file header (no 'DICM' "
                "after the 128-byte preamble); export it from the PACS another way"
            )
        limit = self.limits.max_decompressed_bytes
        try:
            dataset_start, transfer_syntax = _file_meta(data)
            if transfer_syntax == DeflatedExplicitVRLittleEndian:
                inflated = _inflated_size(data[dataset_start:], limit)
                if inflated > limit:
                    raise self._decompressed_too_large(series, "its inflated dataset")
            header = dcmread(BytesIO(data), stop_before_pixels=True)
        except PacsImportError:
            raise
        except Exception as exc:  # pydicom raises many kinds for a damaged header
            raise PacsImportError(
                f"an instance of series {series} is not readable DICOM ({type(exc).__name__}); "
                "check it in the PACS, or leave that study out (--study)"
            ) from None
        if _declared_pixel_bytes(header) > limit:
            raise self._decompressed_too_large(series, "its pixel data as declared")
        uid = str(header.get("SOPInstanceUID", ""))
        return next((ref for ref in batch.refs if ref.sop_uid == uid), None)

    def _decompressed_too_large(self, series: str, what: str) -> PacsImportError:
        return PacsImportError(
            f"an instance of series {series} decompresses to more than "
            f"{self.limits.describe('max_decompressed_bytes')} ({what}); the import stopped "
            "before writing it, and the instances written so far are kept. Raise the limit if "
            "such instances are expected, or leave that study out (--study)"
        )


def _boundary(parameters: str) -> bytes | None:
    for item in parameters.split(";"):
        name, _, value = item.strip().partition("=")
        if name.lower() == "boundary" and value.strip().strip('"'):
            return value.strip().strip('"').encode("latin-1")
    return None


def _part_content(part: bytes) -> bytes | None:
    """The body of one multipart part (after its headers), or None for an empty one."""
    end = part.find(b"\r\n\r\n")
    if end < 0:
        return None
    return part[end + 4 :]


def _file_meta(data: bytes) -> tuple[int, str]:
    """(offset of the dataset after the file meta group, TransferSyntaxUID) of Part 10 bytes."""
    stream = BytesIO(data)
    stream.seek(132)
    meta = read_dataset(
        stream,
        is_implicit_VR=False,
        is_little_endian=True,
        stop_when=lambda tag, vr, length: tag.group != 2,
    )
    return stream.tell(), str(meta.get("TransferSyntaxUID", ""))


def _inflated_size(deflated: bytes, limit: int) -> int:
    """Bytes ``deflated`` (raw deflate) inflates to, counted chunk by chunk and given up just
    past ``limit``: the output is never held whole."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total, tail = 0, deflated
    while True:
        out = inflater.decompress(tail, _CHUNK_BYTES)
        total += len(out)
        tail = inflater.unconsumed_tail
        if total > limit or (not tail and len(out) < _CHUNK_BYTES):
            return total


def _declared_pixel_bytes(header) -> int:
    """What decoding the pixel data would allocate, from the header alone (0 without pixels)."""
    try:
        frames = int(header.get("NumberOfFrames", 1) or 1)
        values = (header.get(name, 0) or 0 for name in ("Rows", "Columns", "SamplesPerPixel"))
        rows, columns, samples = (int(value) for value in values)
        bits = int(header.get("BitsAllocated", 0) or 0)
    except (TypeError, ValueError):
        return 0
    return rows * columns * max(samples, 1) * max(frames, 1) * bits // 8


def _write_atomically(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` through a temporary file, fsynced before it is renamed, so even
    a power cut leaves no half file under the final name. Returns the sha256 of ``data``."""
    atomic_write(path, data, durable=True, prefix=PARTIAL_PREFIX)
    return hashlib.sha256(data).hexdigest()


def _take(items: Iterator[_T], count: int) -> Iterator[_T]:
    """The first ``count`` items; stops the source (and its open HTTP answer) after them."""
    if count <= 0:
        return
    for taken, item in enumerate(items, start=1):
        yield item
        if taken >= count:
            return


# --- edges: errors, logs, progress ------------------------------------------------------------


@contextmanager
def _http_errors(source: DicomwebSource, doing: str, *, searching: bool = False) -> Iterator:
    """Turn transport failures into a `PacsImportError` naming the server and the fix. Messages
    never quote the request URL or the server's answer: both can carry UIDs."""
    root = source.root
    try:
        yield
    except requests.exceptions.SSLError:
        raise PacsImportError(
            f"TLS failed with {root} while {doing}: its certificate is not trusted (or not valid "
            "for this host name); pass the PEM file of the CA that signed it with --ca-bundle"
        ) from None
    except requests.exceptions.Timeout:
        raise PacsImportError(
            f"{root} did not answer within {source.timeout_s:g} s while {doing}; check the "
            "network and the server's load, or allow more time with --timeout"
        ) from None
    except requests.exceptions.ConnectionError:
        raise PacsImportError(
            f"cannot reach the DICOMweb server at {root} while {doing} (connection refused, "
            "host unknown or connection dropped); check the URL's host and port, that the PACS "
            "is running, and that this machine may connect to it"
        ) from None
    except requests.exceptions.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        raise PacsImportError(_http_status_message(source, status, doing, searching)) from None
    except requests.exceptions.JSONDecodeError:
        raise PacsImportError(
            f"{root} answered while {doing}, but not with DICOM JSON: it is not a DICOMweb "
            "(QIDO-RS) root; check the URL's path (for Orthanc: http://HOST:8042/dicom-web)"
        ) from None
    except requests.exceptions.RequestException as exc:
        raise PacsImportError(
            f"the request to {root} failed while {doing} ({type(exc).__name__}); check the URL"
        ) from None
    except PacsImportError:
        raise
    except Exception as exc:  # retrying.RetryError, pydicom parse errors in multipart answers
        raise PacsImportError(
            f"{root} kept failing while {doing} ({type(exc).__name__}); run the import again "
            "later (it resumes), and check the server's log if it persists"
        ) from None


def _http_status_message(
    source: DicomwebSource, status: int | None, doing: str, searching: bool
) -> str:
    root = source.root
    if status == 401:
        if source.username is None:
            return (
                f"{root} requires a login (HTTP 401) while {doing}; pass --username USER and "
                "--password-env VAR with the password in environment variable VAR"
            )
        return (
            f"{root} refused the login (HTTP 401) while {doing}; check --username and the "
            f"password in the environment variable {source.password_env}"
        )
    if status == 403:
        return (
            f"{root} denied access (HTTP 403) while {doing}; ask the PACS administrator to let "
            "this user search and retrieve studies over DICOMweb"
        )
    if status == 404 and searching:
        return (
            f"{root} has no DICOMweb service (HTTP 404 for {urlsplit(root).path or '/'}/studies); "
            "check the URL's path (for Orthanc: http://HOST:8042/dicom-web) and that the server's "
            "DICOMweb plugin is installed and enabled (Debian: orthanc-dicomweb)"
        )
    if status == 404:
        return (
            f"{root} no longer has an item its own search listed (HTTP 404) while {doing}; it "
            "was probably deleted meanwhile: run the import again (it resumes)"
        )
    return (
        f"{root} answered HTTP {status} while {doing}; check the server's log, then run the "
        "import again (it resumes)"
    )


@contextmanager
def _disk_errors(out_dir: Path) -> Iterator[None]:
    """Turn a failure to read or write the data folder (or the journal beside it) into a
    `PacsImportError` that says what to check."""
    try:
        yield
    except OSError as exc:
        raise PacsImportError(
            f"cannot read or write {out_dir} or its journal ({exc.strerror or type(exc).__name__});"
            " check free disk space and that this user may write there, then run the import "
            "again (it resumes)"
        ) from None


@contextmanager
def _transport_quiet() -> Iterator[None]:
    """Keep dicomweb-client, urllib3, retrying and pydicom log records and warnings out of logs:
    they quote request URLs (which hold UIDs), retried tracebacks and header values."""
    quiet = [logging.getLogger(name) for name in _TRANSPORT_LOGGERS]
    saved = [each.level for each in quiet]
    for each in quiet:
        each.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for each, level in zip(quiet, saved, strict=True):
            each.setLevel(level)


class _Bars:
    """Rich progress bars on stderr, or nothing when disabled."""

    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress

    def add_task(self, description: str, total: int) -> int | None:
        if self._progress is None:
            return None
        return self._progress.add_task(description, total=total)

    def advance(self, task: int | None) -> None:
        if self._progress is not None and task is not None:
            self._progress.advance(task)


@contextmanager
def _bars(enabled: bool) -> Iterator[_Bars]:
    if not enabled:
        yield _Bars(None)
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as progress:
        yield _Bars(progress)
