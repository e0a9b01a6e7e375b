"""Header reading and the pure series checks: each fault gets its reason, a good stack passes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest

from site_app.dicom_headers import SliceHeader, parse_age, patient_key, read_header
from site_app.dicom_series import (
    series_folder,
    series_geometry,
    series_key,
    series_problems,
    split_identical_copies,
)
from site_app.quarantine import QuarantineEntry, QuarantineReason
from tests.site_app.dicom_factory import AXIAL, Patient, write_ct_series

R = QuarantineReason


def stack(
    n: int = 6, *, step: float = 2.5, orientation=AXIAL, zs=None, **overrides
) -> list[SliceHeader]:
    """Headers of an axial stack, one per slice at z = k * step (or ``zs``), in file-name order."""
    positions = zs if zs is not None else [k * step for k in range(n)]
    return [
        SliceHeader(
            path=f"ct/{k:03d}.dcm",
            digest=f"digest-{k}",
            sop_class_uid=pydicom.uid.CTImageStorage,
            modality="CT",
            series_uid="1.2.3",
            sop_instance_uid=f"1.2.3.{k}",
            patient_key="p-1",
            has_pixel_data=True,
            rows=16,
            columns=16,
            position_mm=(0.0, 0.0, float(z)),
            orientation=tuple(orientation),
            pixel_spacing_mm=(0.8, 0.9),
            frame_of_reference_uid="1.2.9",
            **overrides,
        )
        for k, z in enumerate(positions)
    ]


def changed(headers: list[SliceHeader], index: int, **changes) -> list[SliceHeader]:
    headers = list(headers)
    headers[index] = dataclasses.replace(headers[index], **changes)
    return headers


def test_a_regular_stack_has_no_problems_and_is_ordered_by_position():
    shuffled = [stack()[i] for i in (3, 0, 5, 1, 4, 2)]
    assert series_problems(shuffled) == []
    geometry = series_geometry(shuffled)
    assert [h.position_mm[2] for h in geometry.slices] == [0.0, 2.5, 5.0, 7.5, 10.0, 12.5]
    assert geometry.spacing_mm == (0.8, 0.9, 2.5)
    assert geometry.origin_mm == (0.0, 0.0, 0.0)


def test_slices_ascend_along_the_normal_not_along_z():
    # Row cosine x column cosine = (0, 0, -1) here, so ascending order means decreasing z.
    flipped = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
    headers = stack(4, orientation=flipped)
    assert series_problems(headers) == []
    assert [h.position_mm[2] for h in series_geometry(headers).slices] == [7.5, 5.0, 2.5, 0.0]


BAD_STACKS = {
    "no position": (changed(stack(), 2, position_mm=None), {R.MISSING_GEOMETRY}),
    "no orientation": (changed(stack(), 0, orientation=None), {R.MISSING_GEOMETRY}),
    "no pixel spacing": (changed(stack(), 5, pixel_spacing_mm=None), {R.MISSING_GEOMETRY}),
    "skewed cosines": (
        stack(orientation=(1.0, 0.0, 0.0, 0.5, 0.5, 0.0)),
        {R.MISSING_GEOMETRY},
    ),
    "one slice rotated": (
        changed(stack(), 3, orientation=(0.0, 1.0, 0.0, -1.0, 0.0, 0.0)),
        {R.MIXED_ORIENTATION},
    ),
    "sheared stack": (changed(stack(), 4, position_mm=(3.0, 0.0, 10.0)), {R.MIXED_ORIENTATION}),
    "gap of one slice": (stack(zs=[0, 2.5, 5, 10, 12.5, 15]), {R.MISSING_SLICES}),
    "irregular step": (stack(zs=[0, 2.5, 5, 6, 8.5, 11]), {R.MISSING_SLICES}),
    "single slice": (stack(1), {R.MISSING_SLICES}),
    "two slices at one place": (stack(zs=[0, 2.5, 2.5, 5, 7.5]), {R.DUPLICATE_INSTANCE}),
    "one SOP UID twice": (changed(stack(), 1, sop_instance_uid="1.2.3.0"), {R.DUPLICATE_INSTANCE}),
    "other size": (changed(stack(), 1, rows=32), {R.MIXED_SERIES}),
    "other frame of reference": (
        changed(stack(), 1, frame_of_reference_uid="9.9"),
        {R.MIXED_SERIES},
    ),
    "other patient": (changed(stack(), 1, patient_key="p-2"), {R.MIXED_SERIES}),
}


@pytest.mark.parametrize("headers, expected", BAD_STACKS.values(), ids=BAD_STACKS.keys())
def test_each_fault_is_reported_with_its_reason(headers, expected):
    problems = series_problems(headers)
    assert {p.reason for p in problems} == expected
    assert all(p.detail for p in problems)


def test_a_gap_is_described_in_slices_and_millimetres():
    (problem,) = series_problems(stack(zs=[0, 2.5, 5, 12.5, 15, 17.5]))
    assert "gap of 2 slice(s) between positions 5.00 mm and 12.50 mm" in problem.detail


def test_every_missing_field_is_reported_not_just_the_first():
    headers = changed(changed(stack(), 0, position_mm=None), 1, pixel_spacing_mm=None)
    details = " | ".join(p.detail for p in series_problems(headers))
    assert "ImagePositionPatient" in details and "PixelSpacing" in details
    assert "ct/000.dcm" in details and "ct/001.dcm" in details


def test_identical_copies_are_split_off_and_the_original_kept():
    headers = stack(3)
    copy = dataclasses.replace(headers[1], path="ct/001_copy.dcm")
    kept, copies = split_identical_copies([copy, *headers])
    assert [h.path for h in kept] == ["ct/000.dcm", "ct/001.dcm", "ct/002.dcm"]
    assert copies == [(copy, headers[1])]


@pytest.mark.parametrize(
    "paths, folder",
    [
        (["a/b/1.dcm", "a/b/2.dcm"], "a/b"),
        (["a/b/1.dcm", "a/c/2.dcm"], "a"),
        (["1.dcm", "a/2.dcm"], "."),
        (["1.dcm"], "."),
    ],
)
def test_series_folder_is_the_common_parent(paths, folder):
    assert series_folder(paths) == folder


@pytest.mark.parametrize(
    "text, years",
    [("045Y", 45), ("006M", 0), ("018M", 1), ("010W", 0), ("003D", 0), ("", None), ("45", None)],
)
def test_patient_age_is_parsed_to_whole_years(text, years):
    assert parse_age(text) == years


def test_keys_are_hashes_not_identifiers():
    assert series_key("1.2.840.1") == series_key("1.2.840.1")
    assert series_key("1.2.840.1").startswith("s-") and len(series_key("1.2.840.1")) == 14
    assert patient_key("ID-987654321").startswith("p-")
    assert "987654321" not in patient_key("ID-987654321")


# --- read_header on real files ---------------------------------------------------------------


def test_a_written_slice_reads_back_with_its_geometry(tmp_path):
    series = write_ct_series(tmp_path / "ct", n_slices=2, origin=(-10.0, -20.0, 30.0))
    pydicom.config.settings.reading_validation_mode = pydicom.config.RAISE
    try:
        pydicom.dcmread(series.files[1])  # the factory writes standard-conformant files
    finally:
        pydicom.config.settings.reading_validation_mode = pydicom.config.WARN
    header = read_header(series.files[1], tmp_path)
    assert isinstance(header, SliceHeader)
    assert header.path == "ct/slice_001.dcm"
    assert header.position_mm == (-10.0, -20.0, 32.5)
    assert header.orientation == AXIAL
    assert header.pixel_spacing_mm == (0.8, 0.9)
    assert (header.rows, header.columns) == (16, 16)
    assert (header.sex, header.age_years, header.slice_thickness_mm) == ("F", 45, 2.5)
    assert header.patient_key == patient_key(Patient().patient_id)


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"just some notes\n", R.NOT_DICOM),
        (b"", R.NOT_DICOM),
        (b"\0" * 128 + b"DICM" + b"\x02\x00", R.TRUNCATED),
    ],
    ids=["text", "empty", "marker then nothing"],
)
def test_files_that_are_not_readable_dicom_become_entries(tmp_path, content, reason):
    path = tmp_path / "x.dcm"
    path.write_bytes(content)
    entry = read_header(path, tmp_path)
    assert isinstance(entry, QuarantineEntry)
    assert (entry.path, entry.reason) == ("x.dcm", reason)


def test_dicom_without_preamble_is_not_dicom_with_a_hint(tmp_path):
    (original,) = write_ct_series(tmp_path / "src", n_slices=1).files
    raw = tmp_path / "raw.dcm"
    raw.write_bytes(original.read_bytes()[132:])  # file meta + dataset, no preamble/"DICM"
    entry = read_header(raw, tmp_path)
    assert isinstance(entry, QuarantineEntry) and entry.reason is R.NOT_DICOM
    assert "raw DICOM stream" in entry.detail


@pytest.mark.parametrize("keep", [0.4, 0.95], ids=["cut in header", "cut in pixel data"])
def test_a_cut_short_slice_is_truncated(tmp_path, keep):
    (original,) = write_ct_series(tmp_path / "src", n_slices=1).files
    data = original.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: int(len(data) * keep)])
    entry = read_header(cut, tmp_path)
    assert isinstance(entry, QuarantineEntry) and entry.reason is R.TRUNCATED


def test_headers_from_files_pass_the_checks(tmp_path):
    series = write_ct_series(tmp_path, n_slices=5, file_order=[4, 3, 2, 1, 0])
    headers = [read_header(f, tmp_path) for f in sorted(tmp_path.iterdir())]
    assert series_problems(headers) == []
    ordered = series_geometry(headers).slices
    assert [h.sop_instance_uid for h in ordered] == series.sop_uids
    assert np.allclose(series_geometry(headers).spacing_mm, series.spacing)


def test_reading_does_not_change_files(tmp_path: Path):
    (path,) = write_ct_series(tmp_path, n_slices=1).files
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    read_header(path, tmp_path)
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
