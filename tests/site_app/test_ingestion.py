"""Ingestion end to end on tiny DICOM folders: good data is used, every fault is quarantined with
its reason, nothing is lost, the cache is reused, and no patient data escapes."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import EnhancedCTImageStorage, generate_uid
from rich.console import Console

from site_app.ct_pixels import stored_pixels
from site_app.data_summary import summarize, summary_table
from site_app.dicom_headers import read_header
from site_app.dicom_series import SeriesProblem, series_key
from site_app.ingestion import IngestionResult, NoDicomFoundError, ingest_site
from site_app.quarantine import QuarantineReason, read_quarantine, write_quarantine
from site_app.volumes import LabelledVolume
from tests.site_app.dicom_factory import (
    Patient,
    WrittenSeries,
    default_mask,
    write_ct_series,
    write_labelled_series,
    write_seg,
    write_undecodable_ct,
)

R = QuarantineReason


def volumes_of(result: IngestionResult) -> dict[str, LabelledVolume]:
    return {v.series_key: v for p in result.patients for v in p.volumes}


def assert_ingested(result: IngestionResult, series: WrittenSeries, mask: np.ndarray) -> None:
    volume = volumes_of(result)[series_key(series.series_uid)]
    assert volume.image_hu.dtype == np.float32 and volume.label.dtype == np.uint8
    assert volume.image_hu.shape == volume.label.shape == series.expected_hu.shape
    np.testing.assert_array_equal(volume.image_hu, series.expected_hu)
    np.testing.assert_array_equal(volume.label, mask)
    assert volume.spacing_mm == pytest.approx(series.spacing)


def assert_every_file_accounted_for(result: IngestionResult, root: Path) -> None:
    """Each file under ``root`` is used or set aside by a quarantine entry, and nothing else."""
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    quarantined = set().union(*(e.covered_files for e in result.quarantine))
    assert set(result.used_files) | quarantined == files
    assert not set(result.used_files) & quarantined


def files_and_times(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


# --- good data -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "file_order, orientation",
    [
        (None, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)),
        ([7, 6, 5, 4, 3, 2, 1, 0], (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)),
        ([3, 0, 6, 1, 7, 2, 5, 4], (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)),  # coronal
    ],
    ids=["names in order", "names reversed", "names shuffled, coronal"],
)
def test_a_labelled_series_becomes_one_patient_with_hu_and_label(tmp_path, file_order, orientation):
    series, _ = write_labelled_series(
        tmp_path / "data",
        file_order=file_order,
        orientation=orientation,
        slope=2.0,
        intercept=-1000,
    )
    result = ingest_site(tmp_path / "data")

    assert result.quarantine == ()
    assert (result.files_seen, result.series_found, result.series_usable) == (9, 1, 1)
    (patient,) = result.patients
    assert (patient.sex, patient.age_years) == ("F", 45)
    assert (patient.manufacturer, patient.slice_thickness_mm) == ("ACME Medical", 2.5)
    assert_ingested(result, series, default_mask(series))
    (volume,) = patient.volumes
    assert volume.orientation == orientation
    assert volume.origin_mm == pytest.approx((-10.0, -20.0, 30.0))


def test_slices_the_seg_leaves_out_are_empty(tmp_path):
    series = write_ct_series(tmp_path / "data" / "ct", n_slices=10)
    mask = np.zeros(series.expected_hu.shape, dtype=np.uint8)
    mask[2:5, 3:9, 6] = 1  # one labelled slice: the SEG holds one frame
    write_seg(tmp_path / "data" / "seg.dcm", series, mask)
    assert_ingested(ingest_site(tmp_path / "data"), series, mask)


def test_two_series_of_one_patient_make_one_record(tmp_path):
    root = tmp_path / "data"
    first, _ = write_labelled_series(root / "study1")
    second, _ = write_labelled_series(root / "study2", n_slices=10, spacing=(0.7, 0.7, 1.25))
    other, _ = write_labelled_series(root / "other", patient=Patient(patient_id="ID-222"))

    result = ingest_site(root)

    assert result.series_usable == 3
    records = {len(p.volumes): p for p in result.patients}
    assert sorted(records) == [1, 2]
    assert {v.series_key for v in records[2].volumes} == {
        series_key(first.series_uid),
        series_key(second.series_uid),
    }
    assert [p.patient_key for p in result.patients] == sorted(
        p.patient_key for p in result.patients
    )
    assert_ingested(result, second, default_mask(second))
    assert_ingested(result, other, default_mask(other))


# --- bad data, next to a good series -----------------------------------------------------------


def _scratch(root: Path) -> Path:
    """A folder outside the data root for material that must not be ingested."""
    return root.parent / "scratch"


def not_dicom(root: Path, good: WrittenSeries) -> None:
    (root / "notes.txt").write_text("patient list, do not share\n")


def truncated(root: Path, good: WrittenSeries) -> None:
    (source,) = write_ct_series(_scratch(root), n_slices=1).files
    (root / "broken.dcm").write_bytes(source.read_bytes()[:700])


def undecodable(root: Path, good: WrittenSeries) -> None:
    bad = write_undecodable_ct(root / "jpeg")
    write_seg(root / "jpeg_seg.dcm", bad)


def missing_geometry(root: Path, good: WrittenSeries) -> None:
    def drop_position(k: int, ds: pydicom.Dataset) -> None:
        if k == 3:
            del ds.ImagePositionPatient

    write_ct_series(root / "bad", mutate=drop_position)


def mixed_orientation(root: Path, good: WrittenSeries) -> None:
    def rotate(k: int, ds: pydicom.Dataset) -> None:
        if k == 2:
            ds.ImageOrientationPatient = [0.0, 1.0, 0.0, -1.0, 0.0, 0.0]

    write_ct_series(root / "bad", mutate=rotate)


def missing_slices(root: Path, good: WrittenSeries) -> None:
    write_ct_series(root / "bad", positions_z=[0, 2.5, 5, 12.5, 15, 17.5, 20, 22.5])


def duplicate_position(root: Path, good: WrittenSeries) -> None:
    write_ct_series(root / "bad", positions_z=[0, 2.5, 5, 5, 7.5, 10, 12.5, 15])


def duplicate_sop_uid(root: Path, good: WrittenSeries) -> None:
    clash = generate_uid()

    def same_uid(k: int, ds: pydicom.Dataset) -> None:
        if k in (1, 2):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = clash

    write_ct_series(root / "bad", mutate=same_uid)


def identical_copy(root: Path, good: WrittenSeries) -> None:
    shutil.copy(good.files[2], root / "copy_of_a_slice.dcm")


def second_seg(root: Path, good: WrittenSeries) -> None:
    write_seg(root / "z_second_seg.dcm", good, np.ones(good.expected_hu.shape, dtype=np.uint8))


def mixed_series(root: Path, good: WrittenSeries) -> None:
    def other_frame(k: int, ds: pydicom.Dataset) -> None:
        if k == 5:
            ds.FrameOfReferenceUID = generate_uid()

    write_ct_series(root / "bad", mutate=other_frame)


def unsupported_modality(root: Path, good: WrittenSeries) -> None:
    write_ct_series(root / "mr", modality="MR")


def enhanced_ct(root: Path, good: WrittenSeries) -> None:
    def claim_enhanced(_: int, ds: pydicom.Dataset) -> None:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage

    write_ct_series(root / "enhanced", mutate=claim_enhanced)


def label_without_series(root: Path, good: WrittenSeries) -> None:
    elsewhere = write_ct_series(_scratch(root))
    write_seg(root / "orphan_seg.dcm", elsewhere)


def label_on_rejected_series(root: Path, good: WrittenSeries) -> None:
    gappy = write_ct_series(root / "bad", positions_z=[0, 2.5, 5, 12.5, 15, 17.5])
    write_seg(root / "bad_seg.dcm", gappy)


def label_other_size(root: Path, good: WrittenSeries) -> None:
    bad = write_ct_series(root / "bad")
    write_seg(root / "bad_seg.dcm", bad, frame_shape=(8, 8))


def label_on_more_slices(root: Path, good: WrittenSeries) -> None:
    bad = write_ct_series(_scratch(root) / "bad", n_slices=9)
    write_seg(root / "bad_seg.dcm", bad, np.ones((16, 16, 9), dtype=np.uint8))
    for path in bad.files[:8]:  # the 9th slice never made it into the export
        shutil.copy(path, root / path.name)


def unlabelled(root: Path, good: WrittenSeries) -> None:
    write_ct_series(root / "no_label")


BAD_INPUTS: dict[str, tuple[Callable[[Path, WrittenSeries], None], set[QuarantineReason]]] = {
    "not DICOM": (not_dicom, {R.NOT_DICOM}),
    "cut short": (truncated, {R.TRUNCATED}),
    "garbage JPEG": (undecodable, {R.UNDECODABLE_PIXELS, R.LABEL_WITHOUT_SERIES}),
    "no position": (missing_geometry, {R.MISSING_GEOMETRY}),
    "rotated slice": (mixed_orientation, {R.MIXED_ORIENTATION}),
    "gap": (missing_slices, {R.MISSING_SLICES}),
    "two slices at one place": (duplicate_position, {R.DUPLICATE_INSTANCE}),
    "SOP UID twice": (duplicate_sop_uid, {R.DUPLICATE_INSTANCE}),
    "identical copy": (identical_copy, {R.DUPLICATE_INSTANCE}),
    "second SEG": (second_seg, {R.DUPLICATE_INSTANCE}),
    "other frame of reference": (mixed_series, {R.MIXED_SERIES}),
    "MR": (unsupported_modality, {R.UNSUPPORTED_MODALITY}),
    "Enhanced CT": (enhanced_ct, {R.UNSUPPORTED_MODALITY}),
    "SEG of absent series": (label_without_series, {R.LABEL_WITHOUT_SERIES}),
    "SEG of rejected series": (
        label_on_rejected_series,
        {R.MISSING_SLICES, R.LABEL_WITHOUT_SERIES},
    ),
    "SEG of other size": (label_other_size, {R.LABEL_SIZE_MISMATCH, R.UNLABELLED_SERIES}),
    "SEG of more slices": (label_on_more_slices, {R.LABEL_SIZE_MISMATCH, R.UNLABELLED_SERIES}),
    "no SEG": (unlabelled, {R.UNLABELLED_SERIES}),
}


@pytest.mark.parametrize("make_bad, reasons", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_quarantined_and_loses_nothing(tmp_path, make_bad, reasons):
    root = tmp_path / "data"
    good, _ = write_labelled_series(root / "good")
    make_bad(root, good)

    result = ingest_site(root)

    assert {e.reason for e in result.quarantine} == reasons
    assert all(e.detail and not e.path.startswith("/") for e in result.quarantine)
    assert result.series_usable == 1
    assert_ingested(result, good, default_mask(good))
    assert_every_file_accounted_for(result, root)


def test_every_reason_is_covered_by_the_table():
    covered = set().union(*(reasons for _, reasons in BAD_INPUTS.values()))
    assert covered == set(QuarantineReason)


def test_enhanced_ct_is_named_in_the_detail(tmp_path):
    enhanced_ct(tmp_path / "data", None)
    (entry,) = ingest_site(tmp_path / "data").quarantine
    assert entry.reason is R.UNSUPPORTED_MODALITY and "Enhanced CT" in entry.detail


def test_a_rescale_that_is_not_a_number_names_the_file(tmp_path):
    series = write_ct_series(tmp_path / "data" / "ct", slope=3.25)
    write_seg(tmp_path / "data" / "seg.dcm", series)
    data = series.files[4].read_bytes()
    assert data.count(b"3.25") == 1
    series.files[4].write_bytes(data.replace(b"3.25", b"3x25"))  # RescaleSlope, as written

    entries = {e.reason: e for e in ingest_site(tmp_path / "data").quarantine}

    assert set(entries) == {R.UNDECODABLE_PIXELS, R.LABEL_WITHOUT_SERIES}
    detail = entries[R.UNDECODABLE_PIXELS].detail
    assert "RescaleSlope or RescaleIntercept of ct/slice_004.dcm is not a number" in detail


def test_a_gap_names_the_series_and_the_missing_slices(tmp_path):
    root = tmp_path / "data"
    series = write_ct_series(root / "bad", positions_z=[0, 2.5, 5, 12.5, 15])
    result = ingest_site(root)
    (entry,) = result.quarantine
    assert (entry.path, entry.series_key) == ("bad", series_key(series.series_uid))
    assert "gap of 2 slice(s) between positions 35.00 mm and 42.50 mm" in entry.detail


@pytest.mark.parametrize("keep", [300, 0.8], ids=["cut in header", "cut in pixel data"])
def test_a_truncated_stray_copy_does_not_spoil_its_series(tmp_path, keep):
    root = tmp_path / "data"
    good, _ = write_labelled_series(root / "good")
    data = good.files[4].read_bytes()
    size = keep if isinstance(keep, int) else int(len(data) * keep)
    (root / "good" / "ct" / "slice_004 (copy).dcm").write_bytes(data[:size])

    result = ingest_site(root)

    (entry,) = result.quarantine
    assert (entry.path, entry.reason) == ("good/ct/slice_004 (copy).dcm", R.TRUNCATED)
    assert_ingested(result, good, default_mask(good))


# --- cache -------------------------------------------------------------------------------------


def test_a_second_run_reads_the_cache_and_a_changed_file_is_decoded_again(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    good, _ = write_labelled_series(root / "a")
    other, _ = write_labelled_series(root / "b", patient=Patient(patient_id="ID-2"))

    first = ingest_site(root, cache_dir=cache)
    second = ingest_site(root, cache_dir=cache)

    assert (first.cache_hits, second.cache_hits) == (0, 2)
    assert second.patients == first.patients
    assert second.quarantine == first.quarantine
    assert len(list(cache.glob("*.npy"))) == 2
    assert not list(cache.glob("*.tmp"))

    ds = pydicom.dcmread(good.files[3])
    stored = ds.pixel_array.copy()
    stored[0, 0] = 1234
    ds.PixelData = stored.tobytes()
    ds.save_as(good.files[3])
    third = ingest_site(root, cache_dir=cache)

    assert third.cache_hits == 1
    changed = volumes_of(third)[series_key(good.series_uid)]
    assert changed.image_hu[0, 0, 3] == 1234 - 1024
    assert (
        volumes_of(third)[series_key(other.series_uid)]
        == volumes_of(first)[series_key(other.series_uid)]
    )


@pytest.mark.parametrize("slope", [1.0, 0.37], ids=["whole HU", "fractional HU"])
def test_the_cache_gives_back_exactly_what_was_decoded(tmp_path, slope):
    root, cache = tmp_path / "data", tmp_path / "cache"
    good, _ = write_labelled_series(root, slope=slope, intercept=-1024.5 if slope != 1 else -1024)

    first = ingest_site(root, cache_dir=cache)
    second = ingest_site(root, cache_dir=cache)

    assert second.cache_hits == 1
    assert second.patients == first.patients
    assert_ingested(second, good, default_mask(good))


def test_a_second_run_parses_no_unchanged_file_and_a_changed_one_again(tmp_path, monkeypatch):
    """Headers are cached by content hash: a rerun reads and hashes every file but parses only
    the ones whose bytes changed."""
    import site_app.dicom_headers as dicom_headers

    root, cache = tmp_path / "data", tmp_path / "cache"
    good, _ = write_labelled_series(root / "a")
    missing_slices(root, good)
    first = ingest_site(root, cache_dir=cache)
    parsed = []
    real_dcmread = dicom_headers.dcmread
    monkeypatch.setattr(
        dicom_headers,
        "dcmread",
        lambda source, **kw: parsed.append(1) or real_dcmread(source, **kw),
    )

    second = ingest_site(root, cache_dir=cache)
    assert parsed == []
    assert (second.patients, second.quarantine) == (first.patients, first.quarantine)

    ds = pydicom.dcmread(good.files[0])
    ds.SliceThickness = 2.5001
    ds.save_as(good.files[0])
    third = ingest_site(root, cache_dir=cache)
    assert len(parsed) == 1
    assert third.cache_hits == 0 and third.series_usable == 1


def test_an_unreadable_header_cache_means_parsing_again(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    write_labelled_series(root)
    first = ingest_site(root, cache_dir=cache)
    (cache / "headers.json").write_text('{"version": "fedseg-ingest-v2", "headers": {"x": 1}}')

    again = ingest_site(root, cache_dir=cache)

    assert (again.patients, again.quarantine) == (first.patients, first.quarantine)
    assert '"x"' not in (cache / "headers.json").read_text()  # rewritten from this run


def test_a_file_rewritten_after_its_header_was_read_is_not_decoded(tmp_path):
    root = tmp_path / "data"
    good = write_ct_series(root)
    header = read_header(good.files[2], root)
    ds = pydicom.dcmread(good.files[2])
    ds.PixelData = bytes(len(ds.PixelData))
    ds.save_as(good.files[2])

    problem = stored_pixels(good.files[2], header)

    assert isinstance(problem, SeriesProblem) and problem.reason is R.TRUNCATED
    assert "changed while fedseg was reading" in problem.detail


def test_an_unreadable_cache_file_is_decoded_again(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    good, _ = write_labelled_series(root)
    ingest_site(root, cache_dir=cache)
    (cache_file,) = cache.glob("*.npy")
    cache_file.write_bytes(b"not a zip")

    result = ingest_site(root, cache_dir=cache)

    assert result.cache_hits == 0
    assert_ingested(result, good, default_mask(good))


def test_the_data_folder_is_never_written(tmp_path):
    root = tmp_path / "data"
    write_labelled_series(root / "a")
    missing_slices(root, None)
    before = files_and_times(root)

    ingest_site(root, cache_dir=tmp_path / "cache")

    assert files_and_times(root) == before


def test_a_cache_inside_the_data_folder_is_refused(tmp_path):
    write_labelled_series(tmp_path)
    with pytest.raises(ValueError, match="inside the data folder"):
        ingest_site(tmp_path, cache_dir=tmp_path / "cache")


# --- privacy -----------------------------------------------------------------------------------

PHI = ("ZZTESTNAME", "UNIQUE", "987654321", "19010203", "ACC-555", "REFDOC")


def test_no_patient_data_in_logs_quarantine_summary_or_errors(tmp_path, caplog, capsys):
    root = tmp_path / "data"
    good, _ = write_labelled_series(root / "good")
    for make_bad in (
        truncated,
        missing_slices,
        unsupported_modality,
        undecodable,
        label_other_size,
    ):
        make_bad(root, good)
    not_dicom(root, good)
    uids = {good.series_uid, *good.sop_uids}
    caplog.clear()
    caplog.set_level(logging.DEBUG)

    result = ingest_site(root, cache_dir=tmp_path / "cache", progress=True)
    write_quarantine(result.quarantine, tmp_path / "quarantine.json")
    console = Console(record=True, width=200)
    console.print(summary_table(summarize(result)))
    errors = []
    (tmp_path / "empty").mkdir()
    for bad_dir in (tmp_path / "absent", tmp_path / "empty"):
        with pytest.raises(OSError) as caught:
            ingest_site(bad_dir)
        errors.append(str(caught.value))

    texts = {
        "logs": "\n".join(r.getMessage() for r in caplog.records),
        "quarantine.json": (tmp_path / "quarantine.json").read_text(),
        "summary": console.export_text(),
        "terminal": "".join(capsys.readouterr()),
        "errors": "\n".join(errors),
        "records": repr(result),
    }
    assert result.series_usable == 1 and len(result.quarantine) >= 6
    assert caplog.records, "ingestion should log what it did"
    for where, text in texts.items():
        for secret in (*PHI, *uids):
            assert secret not in text, f"{secret!r} leaked into {where}"


def test_the_quarantine_file_round_trips_in_a_stable_order(tmp_path):
    root = tmp_path / "data"
    good, _ = write_labelled_series(root / "good")
    for make_bad in (not_dicom, missing_slices, unsupported_modality, unlabelled):
        make_bad(root, good)
    result = ingest_site(root)

    write_quarantine(reversed(result.quarantine), tmp_path / "q.json")

    assert read_quarantine(tmp_path / "q.json") == list(result.quarantine)
    document = json.loads((tmp_path / "q.json").read_text())
    assert document["schema"] == "fedseg.quarantine/1"
    assert set(document["entries"][0]) == {"path", "reason", "detail", "series_key"}
    (tmp_path / "q.json").write_text('{"schema": "other"}')
    with pytest.raises(ValueError, match=r"q\.json: expected schema"):
        read_quarantine(tmp_path / "q.json")


# --- the data folder itself --------------------------------------------------------------------


def test_a_missing_data_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data folder .*nowhere does not exist"):
        ingest_site(tmp_path / "nowhere")


def test_a_file_given_as_data_folder_is_named(tmp_path):
    (tmp_path / "a.dcm").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match=r"a\.dcm is a file, not a folder"):
        ingest_site(tmp_path / "a.dcm")


@pytest.mark.parametrize("content", [None, "readme"], ids=["empty", "no DICOM"])
def test_a_folder_without_dicom_is_an_error_naming_it(tmp_path, content):
    if content:
        (tmp_path / "readme.txt").write_text(content)
    with pytest.raises(NoDicomFoundError, match=f"no DICOM files in {tmp_path}"):
        ingest_site(tmp_path)


def test_without_progress_nothing_is_printed(tmp_path, capsys):
    write_labelled_series(tmp_path)
    ingest_site(tmp_path, progress=False)
    assert capsys.readouterr() == ("", "")


def test_with_progress_the_bars_name_the_work_on_stderr(tmp_path, capsys):
    write_labelled_series(tmp_path)
    ingest_site(tmp_path, progress=True)
    out, err = capsys.readouterr()
    assert out == ""
    assert "Reading DICOM headers" in err and "files" in err
    assert "Decoding series" in err and "1/1 series" in err
