"""Import studies from a PACS over DICOMweb into a site's data folder: the run, and its files.

`import_from_dicomweb` finds the selected studies (``site_app.dicomweb_search``), lists their
instances, skips those already complete on disk, and fetches the rest
(``site_app.dicomweb_retrieve``), each written atomically and recorded with its sha256 in a
journal beside the data folder, so a rerun resumes. The plan (what to fetch, where each instance
goes) is pure (``site_app.pacs_plan``); the source, selection and caps are
``site_app.dicomweb_source``'s, the errors ``site_app.pacs_errors``'. Folder and file names are
hashes of UIDs, and nothing here logs a UID, a patient name or ID: log lines and errors carry
counts, hashes and the server URL.

The server is not trusted: every UID it sends must follow the DICOM UID grammar before it goes
into a URL, and what one run accepts is capped (`ImportLimits`): search pages, listed instances,
bytes of a search answer, of one instance and of the whole run, and the decompressed size of an
instance. Past a cap the run stops with an error naming it; files written before stay.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TypeVar

from dicomweb_client.api import DICOMwebClient
from rich.console import Console
from rich.progress import Progress

from jobs.atomic_files import atomic_write
from jobs.progress import progress_bar
from site_app.dicom_headers import SliceHeader, read_header
from site_app.dicomweb_retrieve import Retrieval
from site_app.dicomweb_search import find_instances, find_studies, search_client
from site_app.dicomweb_source import DicomwebSource, ImportLimits, StudySelection
from site_app.pacs_errors import PacsImportError, disk_errors, transport_quiet
from site_app.pacs_plan import FetchBatch, InstanceRef, plan_fetches

__all__ = [
    "JOURNAL_SUFFIX",
    "PARTIAL_PREFIX",
    "ImportSummary",
    "import_from_dicomweb",
    "journal_path",
]

logger = logging.getLogger(__name__)

JOURNAL_SUFFIX = ".fedseg-import.jsonl"
"""The journal sits beside the data folder (``<out>`` + this), not in it: ingestion reads every
file under the data folder, and a JSON file there would be quarantined as not DICOM."""


PARTIAL_PREFIX = ".fedseg-partial-"
"""Name prefix of a file still being written; only ever renamed into place once complete."""


_T = TypeVar("_T")


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
        limits: what the run accepts from the server (default: the ``MAX_*`` of
            ``site_app.dicomweb_source``).
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
    with disk_errors(out_dir):
        journal = _Journal(journal_path(out_dir))
        removed = _remove_partial_files(out_dir)
    if removed:
        logger.info("removed %d partial file(s) left by an interrupted import", removed)
    if source.sends_password_in_clear:
        logger.warning(
            "basic auth over plain http sends the PACS password unencrypted; use the server's "
            "https URL (with --ca-bundle if its certificate is signed by the hospital's CA)"
        )

    client = search_client(source, limits)
    with transport_quiet():
        studies = find_studies(client, source, selection, limits)
        with _bars(progress) as bars:  # shown once the server has answered
            refs = _list_instances(client, source, studies, limits, bars)
            with disk_errors(out_dir):
                present = _present_on_disk(refs, out_dir, journal)
            batches = plan_fetches(refs, present)
            missing = sum(len(batch.refs) for batch in batches)
            budget = missing if limit is None else min(limit, missing)
            retrieval = Retrieval(source, limits)
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
    bars: Progress,
) -> list[InstanceRef]:
    task = bars.add_task("Listing instances", total=len(studies))
    refs: list[InstanceRef] = []
    for study_uid in studies:
        refs += find_instances(client, source, study_uid, limits)
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
    retrieval: Retrieval,
    batches: Sequence[FetchBatch],
    out_dir: Path,
    journal: _Journal,
    budget: int,
    bars: Progress,
) -> int:
    """Fetch up to ``budget`` instances of ``batches`` into ``out_dir``; returns how many.
    Each instance is journaled as soon as it is written, so an error later loses none."""
    task = bars.add_task("Importing instances", total=budget)
    fetched = 0
    for batch in batches:
        if fetched >= budget:
            break
        for ref, data in _take(retrieval.instances(batch), budget - fetched):
            with disk_errors(out_dir):
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


@contextmanager
def _bars(enabled: bool) -> Iterator[Progress]:
    """Progress bars on stderr (silent when disabled)."""
    with progress_bar(console=Console(stderr=True), enabled=enabled) as progress:
        yield progress
