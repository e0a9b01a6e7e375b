"""WADO-RS retrieval of instances as stored on the PACS, read part by part and capped.

`Retrieval` fetches a series (or single instances) with an Accept header asking for every
transfer syntax, so the bytes are the PACS's own; it splits the multipart/related answer here
rather than in dicomweb-client (which buffers a part of any size), caps each instance in bytes
while it arrives and the run's total, and checks an instance's decompressed size (declared
pixel data; an inflated deflated dataset) before pydicom parses it. Retries 408/429/503/504
with backoff.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator
from io import BytesIO

import requests
from pydicom import dcmread
from pydicom.filereader import read_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian

from site_app.dicom_series import series_key
from site_app.dicomweb_source import DicomwebSource, ImportLimits, http_session, http_timeout
from site_app.pacs_errors import PacsImportError, http_errors
from site_app.pacs_plan import FetchBatch, InstanceRef, is_dicom_uid

__all__ = [
    "AS_STORED",
    "Retrieval",
]


AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
"""WADO-RS Accept header: every transfer syntax, so the server sends files as stored (no
transcoding) and the bytes on disk are the PACS's own."""


_RETRIES = 4


_RETRY_WAIT_MULTIPLIER_MS = 500


_RETRY_STATUSES = frozenset({408, 429, 503, 504})


_CHUNK_BYTES = 1 << 20


_PART_HEADER_BYTES = 64 << 10


class Retrieval:
    """WADO-RS retrieval, read part by part here rather than by dicomweb-client, which buffers a
    part of any size and hands it to pydicom (which inflates a deflated dataset of any size):
    each instance is capped in bytes while it arrives, its decompressed size is checked before
    it is parsed, and the run's bytes are counted."""

    def __init__(self, source: DicomwebSource, limits: ImportLimits) -> None:
        self.source, self.limits = source, limits
        self.session = http_session(source)
        self.received = 0

    def instances(self, batch: FetchBatch) -> Iterator[tuple[InstanceRef, bytes]]:
        """The batch's instances as (ref, Part 10 bytes as the server sent them): one series
        request when the whole series is wanted, then one request per instance the series
        answer did not hold."""
        received: set[InstanceRef] = set()
        if batch.whole_series:
            with http_errors(self.source, "retrieving a series"):
                for data in self._parts(batch.study_uid, batch.series_uid, series=batch.series_uid):
                    ref = self._checked(data, batch)
                    if ref is not None and ref not in received:  # others: added after the search
                        received.add(ref)
                        yield ref, data
        for ref in batch.refs:
            if ref not in received:
                with http_errors(self.source, "retrieving an instance"):
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
                url, headers={"Accept": AS_STORED}, stream=True, timeout=http_timeout(self.source)
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
