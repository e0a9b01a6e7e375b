"""Ingestion over real vendor files: every file shipped with pydicom's test data and with the
``pydicom-data`` package (compressed, big endian, multi-vendor, deliberately broken) is either
used or quarantined with a reason: no crash, no hang.

The corpus is copied into one folder and ingested in one call, twice (cold, then from the
cache), in a child process under a time limit, so a hang or a crash in a C codec fails the test
instead of stalling CI. The child also decodes every file with pixel data the way ingestion
decodes CT slices, and checks the result against pydicom's own ``pixel_array``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from io import BytesIO
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TIME_LIMIT_S = 300  # the whole corpus takes a few seconds; a hang fails here


def corpus_roots() -> dict[str, Path]:
    import data_store
    import pydicom

    return {
        "pydicom": Path(pydicom.__file__).parent / "data",
        "data_store": Path(data_store.__file__).parent / "data",
    }


def copy_corpus(destination: Path) -> list[str]:
    """Every data file of both packages under ``destination/<package>/``; returns their paths."""
    copied = []
    for name, root in corpus_roots().items():
        for path in sorted(root.rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts or path.suffix == ".py":
                continue
            target = destination / name / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            copied.append(target.relative_to(destination).as_posix())
    return copied


def run_corpus(corpus: str, cache: str, out: str) -> None:
    """Child-process side: ingest ``corpus`` twice with ``cache``, decode every image file, and
    write what happened to ``out`` as JSON."""
    import numpy as np
    from pydicom import dcmread

    from site_app.ct_pixels import decode_pixels, stored_pixels
    from site_app.dicom_headers import SliceHeader, pixel_layout, read_header
    from site_app.dicom_series import SeriesProblem
    from site_app.ingestion import ingest_site

    def same(ours: np.ndarray, theirs: np.ndarray) -> bool:
        return bool(ours.dtype == theirs.dtype and np.array_equal(ours, theirs))

    root = Path(corpus)
    runs = [ingest_site(root, cache_dir=Path(cache)) for _ in range(2)]
    decoded = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            dataset = dcmread(path)
        except Exception:
            continue  # not a file pydicom reads: nothing to compare with
        if "PixelData" not in dataset:
            continue
        syntax = str(dataset.file_meta.get("TransferSyntaxUID", ""))
        outcome: dict[str, object] = {"syntax": syntax}
        try:
            theirs = dataset.pixel_array
        except Exception as exc:
            theirs, outcome["pydicom"] = None, type(exc).__name__
        data = path.read_bytes()
        layout = pixel_layout(dcmread(BytesIO(data)))
        try:
            ours = decode_pixels(data, syntax, layout)
        except Exception as exc:
            ours, outcome["ours"] = None, type(exc).__name__
        if ours is not None and theirs is not None:
            outcome["same"] = same(ours, theirs)
        if layout is not None and theirs is not None:
            # Everything before the Pixel Data zeroed: only the no-reparse path can decode this.
            blind = bytes(layout.offset) + data[layout.offset :]
            try:
                outcome["same_without_reparse"] = same(decode_pixels(blind, syntax, layout), theirs)
            except Exception as exc:
                outcome["same_without_reparse"] = type(exc).__name__
        header = read_header(path, root)
        if isinstance(header, SliceHeader):  # what a CT slice of this file would give
            as_slice = stored_pixels(path, header)
            outcome["slice"] = (
                as_slice.reason.value if isinstance(as_slice, SeriesProblem) else "ok"
            )
        decoded[path.relative_to(root).as_posix()] = outcome
    first, second = runs
    document = {
        "files_seen": first.files_seen,
        "used": list(first.used_files),
        "entries": [
            {"path": e.path, "reason": e.reason.value, "detail": e.detail, "files": e.covered_files}
            for e in first.quarantine
        ],
        "second_run_same": second.quarantine == first.quarantine
        and second.used_files == first.used_files,
        "decoded": decoded,
    }
    Path(out).write_text(json.dumps(document))


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory) -> tuple[list[str], dict]:
    work = tmp_path_factory.mktemp("corpus")
    data, cache, out = work / "data", work / "cache", work / "result.json"
    files = copy_corpus(data)
    assert len(files) > 250, "pydicom's test files and pydicom-data should both be installed"
    command = (
        "import sys; from tests.site_app.test_dicom_corpus import run_corpus; "
        "run_corpus(*sys.argv[1:])"
    )
    try:
        child = subprocess.run(
            [sys.executable, "-X", "faulthandler", "-c", command, *map(str, (data, cache, out))],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=TIME_LIMIT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"ingesting the corpus hung: no result after {TIME_LIMIT_S} s")
    assert child.returncode == 0, f"ingestion crashed (exit {child.returncode}):\n{child.stderr}"
    return files, json.loads(out.read_text())


def by_path(result: dict) -> dict[str, set[str]]:
    reasons: dict[str, set[str]] = {}
    for entry in result["entries"]:
        for path in entry["files"]:
            reasons.setdefault(path, set()).add(entry["reason"])
    return reasons


def test_every_file_is_used_or_quarantined_with_a_reason(corpus_run) -> None:
    files, result = corpus_run
    reasons = by_path(result)
    assert result["files_seen"] == len(files)
    unaccounted = set(files) - set(result["used"]) - set(reasons)
    assert unaccounted == set()
    assert set(reasons) | set(result["used"]) == set(files)
    assert all(entry["detail"] for entry in result["entries"])


def test_a_second_run_from_the_cache_gives_the_same_answer(corpus_run) -> None:
    assert corpus_run[1]["second_run_same"]


@pytest.mark.parametrize(
    "path, reason",
    [
        ("pydicom/test_files/MR_truncated.dcm", "truncated"),
        ("pydicom/test_files/rtplan_truncated.dcm", "truncated"),
        ("data_store/emri_small_jpeg_2k_lossless_too_short.dcm", "truncated"),
        ("pydicom/test_files/no_meta.dcm", "not_dicom"),
        ("pydicom/test_files/README.txt", "not_dicom"),
        ("pydicom/test_files/dicomdirtests/DICOMDIR", "unsupported_modality"),
        ("pydicom/palettes/hotiron.dcm", "unsupported_modality"),
        ("pydicom/test_files/waveform_ecg.dcm", "unsupported_modality"),
        ("data_store/liver.dcm", "label_without_series"),  # a SEG whose CT is not there
        ("data_store/eCT_Supplemental.dcm", "unsupported_modality"),  # Enhanced CT
        ("pydicom/test_files/dicomdirtests/98892001/CT2N/6293", "mixed_orientation"),
        ("pydicom/test_files/dicomdirtests/98892001/CT5N/2062", "unlabelled_series"),
        ("pydicom/test_files/CT_small.dcm", "missing_slices"),  # one slice is no volume
    ],
)
def test_known_faults_get_their_reason(corpus_run, path: str, reason: str) -> None:
    assert reason in by_path(corpus_run[1]).get(path, set())


def test_image_files_decode_as_pydicom_decodes_them(corpus_run) -> None:
    """Ingestion's decoder gives pydicom's ``pixel_array``, value for value, on every file that
    pydicom decodes, and fails (as a quarantine reason, not a crash) where pydicom fails."""
    decoded = corpus_run[1]["decoded"]
    assert len(decoded) > 100
    both = {path: o for path, o in decoded.items() if "ours" not in o and "pydicom" not in o}
    assert len(both) > 100
    assert [path for path, o in both.items() if not o["same"]] == []
    only_one = [path for path, o in decoded.items() if ("ours" in o) != ("pydicom" in o)]
    assert only_one == []
    # Decoding straight from the header's Pixel Data location (no second parse) agrees too.
    located = {path: o for path, o in both.items() if "same_without_reparse" in o}
    assert len(located) > 100
    assert {path: o["same_without_reparse"] for path, o in located.items()} == dict.fromkeys(
        located, True
    )
    undecodable = [path for path, o in decoded.items() if "pydicom" in o]
    assert undecodable, "the corpus holds files no installed codec decodes"
    assert all(
        decoded[path].get("slice", "undecodable_pixels") == "undecodable_pixels"
        for path in undecodable
    )


def test_every_compressed_syntax_in_the_corpus_decodes_somewhere(corpus_run) -> None:
    """The pinned codec plugins are wired in: each syntax decodes for at least one real file."""
    decoded_syntaxes = Counter(
        o["syntax"] for o in corpus_run[1]["decoded"].values() if "ours" not in o
    )
    for syntax in (
        "1.2.840.10008.1.2",  # implicit VR little endian
        "1.2.840.10008.1.2.2",  # explicit VR big endian
        "1.2.840.10008.1.2.1.99",  # deflated
        "1.2.840.10008.1.2.4.50",  # JPEG baseline
        "1.2.840.10008.1.2.4.51",  # JPEG extended
        "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
        "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.5",  # RLE lossless
    ):
        assert decoded_syntaxes[syntax] >= 1, syntax
