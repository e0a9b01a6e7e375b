"""PACS import against a hostile DICOMweb server: bad UIDs, endless pages, bombs, huge instances.

The server is a small http.server on loopback that answers QIDO-RS and WADO-RS the way a
malicious or broken PACS could (a stand-in for one: no real PACS misbehaves on request). Every
test checks that the import stops with an error naming the field or the limit, that no URL
carried the bad value, and that nothing was written outside the output folder.
"""

from __future__ import annotations

import argparse
import gzip
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from site_app.dicomweb_source import DicomwebSource, ImportLimits
from site_app.pacs_errors import PacsImportError
from site_app.pacs_import import import_from_dicomweb, journal_path
from site_app.pacs_plan import is_dicom_uid

STUDY, SERIES = "1.2.826.0.1.1", "1.2.826.0.1.1.2"
BOUNDARY = "fedseg-hostile-boundary"


def _uid(tag: str, value: str) -> dict:
    return {tag: {"vr": "UI", "Value": [value]}}


def _instance_json(series: str, sop: str) -> dict:
    return {**_uid("0020000E", series), **_uid("00080018", sop)}


def _part10(sop: str, *, extra: int = 0, deflated: bool = False) -> bytes:
    """A small DICOM Part 10 file; ``extra`` bytes of zeros in a private element make it big."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = STUDY, SERIES, "CT"
    if extra:
        ds.add_new(0x00091010, "OB", bytes(extra))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = (
        DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
    )
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _multipart(files: list[bytes]) -> bytes:
    body = b"".join(
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
        for data in files
    )
    return body + f"--{BOUNDARY}--\r\n".encode()


@dataclass
class Answer:
    body: bytes
    content_type: str = "application/dicom+json"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Hostile:
    """Routes: a function of (path, query) -> Answer; every request path is recorded."""

    url: str
    requests: list[str]


def _json(value) -> Answer:
    return Answer(json.dumps(value).encode())


@contextmanager
def hostile_pacs(route: Callable[[str, str], Answer]) -> Iterator[Hostile]:
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            seen.append(parts.path)
            answer = route(parts.path.removeprefix("/dw"), parts.query)
            self.send_response(200)
            self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(len(answer.body)))
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(answer.body)

        def log_message(self, *args) -> None:  # keep test output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Hostile(url=f"http://127.0.0.1:{server.server_address[1]}/dw", requests=seen)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _one_series(files: dict[str, bytes]) -> Callable[[str, str], Answer]:
    """A server holding one study, one series with ``files`` (SOP UID -> Part 10 bytes)."""

    def route(path: str, query: str) -> Answer:
        if path == "/studies":
            return _json([] if "offset=0" not in query else [_uid("0020000D", STUDY)])
        if path == f"/studies/{STUDY}/instances":
            if "offset=0" not in query:
                return _json([])
            return _json([_instance_json(SERIES, sop) for sop in files])
        if path == f"/studies/{STUDY}/series/{SERIES}":
            return Answer(
                _multipart(list(files.values())),
                content_type=f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
            )
        sop = path.rsplit("/", 1)[-1]
        return Answer(
            _multipart([files[sop]]),
            content_type=f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
        )

    return route


def _nothing_written(tmp_path: Path) -> bool:
    return not any(tmp_path.rglob("*"))


# --- UIDs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uid", "valid"),
    [
        ("1.2.840.10008.1.2.1", True),
        ("0.1", True),
        ("1.20.0", True),
        ("1." + "2" * 62, True),
        ("1." + "2" * 63, False),  # 65 characters
        ("01.2", False),
        ("1.02", False),
        ("1..2", False),
        ("1.2.", False),
        ("../../etc", False),
        ("1.2/../x", False),
        ("1.2.3\n", False),
        ("", False),
    ],
)
def test_the_uid_grammar(uid, valid):
    assert is_dicom_uid(uid) is valid


@pytest.mark.parametrize(
    ("where", "bad", "field"),
    [
        ("study", "../../etc", "StudyInstanceUID"),
        ("study", "1.2.3\n", "StudyInstanceUID"),
        ("series", "1.2/../x", "SeriesInstanceUID"),
        ("sop", "01.2.3", "SOPInstanceUID"),
        ("sop", "1." + "9" * 70, "SOPInstanceUID"),
    ],
)
def test_a_uid_that_is_not_one_is_refused_before_any_url_or_file(tmp_path, where, bad, field):
    study = bad if where == "study" else STUDY
    series = bad if where == "series" else SERIES
    sop = bad if where == "sop" else "1.2.826.0.1.1.2.3"

    def route(path: str, query: str) -> Answer:
        if path == "/studies":
            return _json([_uid("0020000D", study)] if "offset=0" in query else [])
        if path.endswith("/instances"):
            return _json([_instance_json(series, sop)] if "offset=0" in query else [])
        raise AssertionError(f"the import asked for {path}")

    out = tmp_path / "site"
    refused = pytest.raises(PacsImportError, match=f"returned a {field} that is not a DICOM UID")
    with hostile_pacs(route) as pacs, refused:
        import_from_dicomweb(DicomwebSource(url=pacs.url), out)
    # Only the searches were asked; the bad value never reached a URL.
    assert set(pacs.requests) <= {"/dw/studies", f"/dw/studies/{STUDY}/instances"}
    assert _nothing_written(tmp_path)


def test_the_refusal_does_not_repeat_the_servers_value(tmp_path):
    def route(path: str, query: str) -> Answer:
        return _json([_uid("0020000D", "../../etc/passwd")] if "offset=0" in query else [])

    with hostile_pacs(route) as pacs, pytest.raises(PacsImportError) as error:
        import_from_dicomweb(DicomwebSource(url=pacs.url), tmp_path / "site")
    assert "passwd" not in str(error.value) and "16 characters" in str(error.value)


# --- caps on searches --------------------------------------------------------------------------


def test_a_server_that_pages_forever_is_stopped_at_the_page_cap(tmp_path):
    def route(path: str, query: str) -> Answer:
        offset = int(next(p for p in query.split("&") if p.startswith("offset=")).split("=")[1])
        return _json([_uid("0020000D", f"1.2.{offset + 1}")])  # always one more, never the end

    with hostile_pacs(route) as pacs:
        limits = ImportLimits(max_search_pages=5)
        with pytest.raises(PacsImportError, match=r"after 5 \(--max-search-pages\) pages"):
            import_from_dicomweb(DicomwebSource(url=pacs.url), tmp_path / "site", limits=limits)
    assert len(pacs.requests) == 5
    assert _nothing_written(tmp_path)


def test_a_gzip_bomb_search_answer_counts_inflated(tmp_path):
    inflated = b"[" + b" " * (4 << 20) + b"]"  # 4 MiB of JSON whitespace, ~4 KiB compressed
    bomb = Answer(gzip.compress(inflated), headers={"Content-Encoding": "gzip"})
    assert len(bomb.body) < 64 << 10
    with hostile_pacs(lambda path, query: bomb) as pacs:
        limits = ImportLimits(max_search_answer_bytes=1 << 20)
        with pytest.raises(
            PacsImportError, match=r"search answer larger than 1 MiB \(--max-search-answer-mb\)"
        ):
            import_from_dicomweb(DicomwebSource(url=pacs.url), tmp_path / "site", limits=limits)
    assert _nothing_written(tmp_path)


def test_more_listed_instances_than_the_cap_fetch_nothing(tmp_path):
    files = {f"{SERIES}.{k}": _part10(f"{SERIES}.{k}") for k in range(1, 6)}
    with hostile_pacs(_one_series(files)) as pacs:
        limits = ImportLimits(max_listed_instances=4)
        with pytest.raises(PacsImportError, match=r"more than 4 \(--max-listed-instances\)"):
            import_from_dicomweb(DicomwebSource(url=pacs.url), tmp_path / "site", limits=limits)
    assert _nothing_written(tmp_path)


# --- caps on retrieval -------------------------------------------------------------------------


def test_a_deflate_bomb_is_refused_before_it_is_parsed_or_written(tmp_path):
    bomb = _part10(f"{SERIES}.1", extra=8 << 20, deflated=True)  # inflates to 8 MiB
    assert len(bomb) < 64 << 10
    with hostile_pacs(_one_series({f"{SERIES}.1": bomb})) as pacs:
        limits = ImportLimits(max_decompressed_bytes=1 << 20)
        with pytest.raises(
            PacsImportError,
            match=r"decompresses to more than 1 MiB \(--max-decompressed-mb\) \(its inflated",
        ):
            import_from_dicomweb(DicomwebSource(url=pacs.url), tmp_path / "site", limits=limits)
    assert not list((tmp_path / "site").rglob("*.dcm"))


def test_a_huge_instance_stops_the_import_and_loses_nothing_already_written(tmp_path):
    files = {
        f"{SERIES}.1": _part10(f"{SERIES}.1"),
        f"{SERIES}.2": _part10(f"{SERIES}.2"),
        f"{SERIES}.3": _part10(f"{SERIES}.3", extra=3 << 20),
    }
    out = tmp_path / "site"
    with hostile_pacs(_one_series(files)) as pacs:
        source = DicomwebSource(url=pacs.url)
        limits = ImportLimits(max_instance_bytes=1 << 20)
        with pytest.raises(PacsImportError, match=r"larger than 1 MiB \(--max-instance-mb\)"):
            import_from_dicomweb(source, out, limits=limits)
        written = sorted(out.rglob("*.dcm"))
        assert len(written) == 2
        assert len(journal_path(out).read_text().splitlines()) == 2
        rerun = import_from_dicomweb(source, out)
    assert (rerun.already_present, rerun.fetched, rerun.complete) == (2, 1, True)
    assert {p.read_bytes() for p in out.rglob("*.dcm")} == set(files.values())
    assert {p for p in tmp_path.rglob("*") if p.is_file()} <= {
        *out.rglob("*.dcm"),
        journal_path(out),
    }


def test_the_run_byte_cap_stops_the_run_and_a_rerun_continues(tmp_path):
    files = {f"{SERIES}.{k}": _part10(f"{SERIES}.{k}", extra=200 << 10) for k in range(1, 5)}
    out = tmp_path / "site"
    with hostile_pacs(_one_series(files)) as pacs:
        source = DicomwebSource(url=pacs.url)
        limits = ImportLimits(max_run_bytes=1 << 20)  # the 5th instance takes the run past it
        files[f"{SERIES}.5"] = _part10(f"{SERIES}.5", extra=600 << 10)
        with pytest.raises(PacsImportError, match=r"more than 1 MiB \(--max-run-gb\)"):
            import_from_dicomweb(source, out, limits=limits)
        kept = len(list(out.rglob("*.dcm")))
        assert 1 <= kept < 5
        rerun = import_from_dicomweb(source, out)
    assert (rerun.already_present, rerun.fetched, rerun.complete) == (kept, 5 - kept, True)


def test_limits_must_be_whole_numbers_of_at_least_one():
    with pytest.raises(PacsImportError, match="--max-instance-mb: expected a whole number >= 1"):
        ImportLimits(max_instance_bytes=0)


def test_cli_limit_flags_reach_the_import_and_their_defaults_are_the_constants(tmp_path, capsys):
    from fedseg.cli import build_parser, main
    from site_app import dicomweb_source

    files = {f"{SERIES}.{k}": _part10(f"{SERIES}.{k}") for k in range(1, 6)}
    with hostile_pacs(_one_series(files)) as pacs:
        argv = ["site", "import", "--dicomweb", pacs.url, "--out", str(tmp_path / "site")]
        assert main([*argv, "--max-listed-instances", "4"]) == 2
    assert "more than 4 (--max-listed-instances)" in capsys.readouterr().err
    parser = build_parser()
    for name in ("site", "import"):
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = commands.choices[name]
    helps = {a.option_strings[0]: a.help for a in parser._actions if a.option_strings}
    defaults = ImportLimits()
    for name, (flag, unit) in dicomweb_source.limit_flags().items():
        assert f"(default {getattr(defaults, name) // unit})" in helps[flag], flag
