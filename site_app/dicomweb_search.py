"""QIDO-RS searches through dicomweb-client: studies and their instances, paged and capped.

The server is not trusted: every answer is capped in decoded bytes while it arrives
(``max_search_answer_bytes``, so a gzip bomb counts inflated), paging stops at the first page
with nothing new (a server that ignores the offset) and fails past ``max_search_pages``; the
UIDs found are checked by ``site_app.pacs_plan`` before any is used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import requests
from dicomweb_client.api import DICOMwebClient

from site_app.dicomweb_source import (
    DicomwebSource,
    ImportLimits,
    StudySelection,
    http_session,
    http_timeout,
)
from site_app.pacs_errors import PacsImportError, http_errors
from site_app.pacs_plan import (
    InstanceRef,
    instances_from_search,
    json_value,
    study_modalities,
    study_uids_from_search,
)

__all__ = [
    "find_instances",
    "find_studies",
    "search_client",
]


def search_client(source: DicomwebSource, limits: ImportLimits) -> DICOMwebClient:
    """dicomweb-client for the searches, every answer capped at ``max_search_answer_bytes``."""
    session = http_session(source)

    def cap(response: requests.Response, **_) -> requests.Response:
        response.raw = _CappedBody(response.raw, source, limits)
        return response

    session.hooks["response"].append(cap)
    client = DICOMwebClient(source.root, session=session, timeout=http_timeout(source))
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


def find_studies(
    client: DICOMwebClient, source: DicomwebSource, selection: StudySelection, limits: ImportLimits
) -> list[str]:
    # The modality is matched here, on each result's ModalitiesInStudy, not sent as a filter:
    # Orthanc 1.10's DICOMweb plugin ignores the paging offset when filtering on it.
    with http_errors(source, "searching studies", searching=True):
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
        uid = json_value(result, "0020000D")
        if uid is None:
            continue
        listed = study_modalities(result)
        if listed is None:  # the server did not say: ask for the study's series of that modality
            with http_errors(source, "searching a study's series"):
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
        if json_value(result, "0020000D") == uid:
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


def find_instances(
    client: DICOMwebClient, source: DicomwebSource, study_uid: str, limits: ImportLimits
) -> list[InstanceRef]:
    with http_errors(source, "listing a study's instances"):
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
        new = [result for result in page if json_value(result, key) not in seen]
        if not new:
            return results
        seen.update(json_value(result, key) for result in new)
        results += new
    raise PacsImportError(
        f"{source.root} still answered new results after "
        f"{limits.describe('max_search_pages')} pages of one search; nothing was fetched in this "
        "run. Narrow the selection (--study, --modality), or raise the limit if the PACS really "
        "lists that much"
    )
