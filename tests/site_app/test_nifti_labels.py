"""NIfTI masks as labels: a mask written with nibabel from a simulated patient's SEG gives the
same training tensors as the SEG itself, whatever axis order and direction the file uses; a mask
on another grid, without orientation, or that is an image is quarantined with a clear reason.

NIfTI affines here are built from the DICOM headers as converters build them (voxel -> LPS from
ImagePositionPatient, ImageOrientationPatient and PixelSpacing, then LPS -> RAS), independently of
the code under test.
"""

from __future__ import annotations

import itertools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from site_app.dicom_headers import SliceHeader
from site_app.dicom_series import SeriesGeometry, series_key
from site_app.ingestion import IngestionResult, ingest_site
from site_app.nifti_labels import mask_on_series_grid
from site_app.quarantine import QuarantineReason
from site_app.volumes import LabelledVolume

R = QuarantineReason
RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Case:
    """One simulated patient: its CT slices, its SEG, and what ingestion makes of the pair."""

    ct: Path
    seg: Path
    series_uid: str
    from_seg: LabelledVolume
    affine_lps: np.ndarray
    """Voxel (row, column, slice) -> LPS mm, from the DICOM headers (slices by position)."""


def volumes(result: IngestionResult) -> list[LabelledVolume]:
    return [volume for patient in result.patients for volume in patient.volumes]


def dicom_affine_lps(ct_folder: Path) -> np.ndarray:
    slices = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(ct_folder.iterdir())]
    orientation = np.array(slices[0].ImageOrientationPatient, dtype=float)
    row_cosines, col_cosines = orientation[:3], orientation[3:]
    normal = np.cross(row_cosines, col_cosines)
    slices.sort(key=lambda ds: float(np.dot(normal, np.array(ds.ImagePositionPatient, float))))
    positions = np.array([ds.ImagePositionPatient for ds in slices], dtype=float)
    row_spacing, col_spacing = (float(v) for v in slices[0].PixelSpacing)
    affine = np.eye(4)
    affine[:3, 0] = col_cosines * row_spacing  # down the rows
    affine[:3, 1] = row_cosines * col_spacing  # along a row
    affine[:3, 2] = positions[1] - positions[0]
    affine[:3, 3] = positions[0]
    return affine


@pytest.fixture(scope="module")
def case(tiny_federation, tmp_path_factory) -> Case:
    manifest = json.loads((tiny_federation / "manifest.json").read_text())
    simulated = next(c for c in manifest["sites"][0]["cases"] if c["lesion_voxels"] > 0)
    source = tmp_path_factory.mktemp("case")
    ct = source / "CT"
    ct.mkdir()
    for path in (tiny_federation / simulated["ct_series"]).glob("slice-[0-9][0-9][0-9].dcm"):
        shutil.copy(path, ct / path.name)  # the slices only: no stray copies of broken files
    seg = source / "seg.dcm"
    shutil.copy(tiny_federation / simulated["seg"], seg)
    data = tmp_path_factory.mktemp("with-seg")
    shutil.copytree(ct, data / "case" / "CT")
    shutil.copy(seg, data / "case" / "seg.dcm")
    result = ingest_site(data)
    assert result.quarantine == ()
    (from_seg,) = volumes(result)
    assert from_seg.label.any()
    uid = str(pydicom.dcmread(next(ct.iterdir()), stop_before_pixels=True).SeriesInstanceUID)
    return Case(ct, seg, uid, from_seg, dicom_affine_lps(ct))


def flip(axis: int, size: int) -> np.ndarray:
    """Index map reversing ``axis`` of ``size`` voxels (4, 4)."""
    matrix = np.eye(4)
    matrix[axis, axis], matrix[axis, 3] = -1.0, size - 1
    return matrix


def swap_rows_and_columns() -> np.ndarray:
    return np.eye(4)[[1, 0, 2, 3]]


def as_written(case: Case, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """(voxels, RAS affine) of the SEG's mask stored the way ``layout`` says."""
    label, lps = case.from_seg.label, case.affine_lps
    rows, _, slices = label.shape
    if layout == "rows, columns, slices":
        return label, RAS_FROM_LPS @ lps
    if layout == "columns, rows, slices":  # x fastest, as most converters store it
        return label.transpose(1, 0, 2), RAS_FROM_LPS @ lps @ swap_rows_and_columns()
    if layout == "columns, rows flipped, slices (dcm2niix)":
        data = label.transpose(1, 0, 2)[:, ::-1, :]
        return data, RAS_FROM_LPS @ lps @ swap_rows_and_columns() @ flip(1, rows)
    if layout == "slices reversed":
        return label[:, :, ::-1], RAS_FROM_LPS @ lps @ flip(2, slices)
    raise ValueError(layout)


LAYOUTS = [
    "rows, columns, slices",
    "columns, rows, slices",
    "columns, rows flipped, slices (dcm2niix)",
    "slices reversed",
]


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, *, oriented: bool = True) -> Path:
    """Save with nibabel; ``oriented=False`` stores the affine with sform and qform codes 0."""
    image = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    if not oriented:
        image.set_sform(affine, code=0)
        image.set_qform(affine, code=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


def site_with_ct(tmp_path: Path, case: Case) -> Path:
    root = tmp_path / "data"
    shutil.copytree(case.ct, root / "case" / "CT")
    return root


# --- same tensors as the SEG ---------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "where",
    ["case/label.nii.gz", "case/CT/mask.nii", "labels/{uid}.nii.gz"],
    ids=["next to the series", "in the series folder, uncompressed", "named after the series"],
)
def test_a_nifti_mask_gives_the_same_volume_as_the_seg(tmp_path, case, layout, where) -> None:
    root = site_with_ct(tmp_path, case)
    data, affine = as_written(case, layout)
    mask_path = write_nifti(root / where.format(uid=case.series_uid), data, affine)

    result = ingest_site(root)

    assert result.quarantine == ()
    assert volumes(result) == [case.from_seg]  # image, label, geometry: all equal
    assert mask_path.relative_to(root).as_posix() in result.used_files


def test_fractional_and_multi_label_masks_count_every_label_as_lesion(tmp_path, case) -> None:
    root = site_with_ct(tmp_path, case)
    label = case.from_seg.label
    labels = np.where(label > 0, 2, 0).astype(np.int16)  # e.g. 1 = liver elsewhere, 2 = lesion
    labels[0, 0, 0] = 0
    write_nifti(root / "case" / "labels.nii.gz", labels, RAS_FROM_LPS @ case.affine_lps)
    (volume,) = volumes(ingest_site(root))
    np.testing.assert_array_equal(volume.label, label)

    fractional = np.where(label > 0, 0.8, 0.3).astype(np.float32)
    write_nifti(root / "case" / "labels.nii.gz", fractional, RAS_FROM_LPS @ case.affine_lps)
    (volume,) = volumes(ingest_site(root))
    np.testing.assert_array_equal(volume.label, label)


def test_every_axis_order_and_direction_maps_back(case) -> None:
    """All 48 ways of storing the grid (axis order x direction), on an oblique series."""
    rng = np.random.default_rng(0)
    label = (rng.random((5, 6, 7)) > 0.5).astype(np.uint8)
    angle = np.deg2rad(20)
    row_cosines = (np.cos(angle), np.sin(angle), 0.0)
    col_cosines = (0.0, 0.0, -1.0)
    headers = tuple(
        SliceHeader(
            path=f"s{k}.dcm",
            digest="",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            modality="CT",
            series_uid="1.2.3",
            sop_instance_uid=f"1.2.3.{k}",
            patient_key="p",
            has_pixel_data=True,
            rows=5,
            columns=6,
        )
        for k in range(7)
    )
    geometry = SeriesGeometry(
        slices=headers,
        spacing_mm=(0.8, 0.9, 2.5),
        orientation=(*row_cosines, *col_cosines),
        origin_mm=(-12.0, 30.0, 101.5),
    )
    lps = np.eye(4)
    lps[:3, 0] = np.array(col_cosines) * 0.8
    lps[:3, 1] = np.array(row_cosines) * 0.9
    lps[:3, 2] = np.cross(row_cosines, col_cosines) * 2.5
    lps[:3, 3] = geometry.origin_mm
    for order in itertools.permutations(range(3)):
        for flips in itertools.product((False, True), repeat=3):
            data = np.transpose(label, order)
            to_series = np.zeros((4, 4))
            to_series[3, 3] = 1.0
            for axis, (series_axis, flipped) in enumerate(zip(order, flips, strict=True)):
                to_series[series_axis, axis] = -1.0 if flipped else 1.0
                if flipped:
                    data = np.flip(data, axis)
                    to_series[series_axis, 3] = label.shape[series_axis] - 1
            placed = mask_on_series_grid(data, RAS_FROM_LPS @ lps @ to_series, geometry)
            assert isinstance(placed, np.ndarray), (order, flips, placed)
            np.testing.assert_array_equal(placed, label, err_msg=f"{order} {flips}")


# --- masks that do not fit -----------------------------------------------------------------------


def in_ras(case: Case, index_map: np.ndarray | None = None) -> np.ndarray:
    """The case's RAS affine, composed with ``index_map`` (mask index -> series index)."""
    return RAS_FROM_LPS @ case.affine_lps @ (np.eye(4) if index_map is None else index_map)


def _shift(voxels: tuple[float, float, float]) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, 3] = voxels
    return matrix


def _rotation_z(degrees: float) -> np.ndarray:
    angle = np.deg2rad(degrees)
    matrix = np.eye(4)
    matrix[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    return matrix


BAD_MASKS = {
    "shifted by one slice": (
        lambda c: (c.from_seg.label, in_ras(c, _shift((0, 0, 1)))),
        {},
        R.LABEL_SIZE_MISMATCH,
        "it is shifted by {slice_mm:.2f} mm from the series",
    ),
    "one slice short": (
        lambda c: (c.from_seg.label[:, :, :-1], in_ras(c)),
        {},
        R.LABEL_SIZE_MISMATCH,
        "voxels, the series",
    ),
    "half the resolution": (
        lambda c: (c.from_seg.label[::2, ::2, :], in_ras(c, np.diag([2.0, 2.0, 1.0, 1.0]))),
        {},
        R.LABEL_SIZE_MISMATCH,
        "its voxels are",
    ),
    "rotated 30 degrees in plane": (
        lambda c: (c.from_seg.label, in_ras(c, _rotation_z(30))),
        {},
        R.LABEL_SIZE_MISMATCH,
        "axes are not parallel to the series'",
    ),
    "tilted 2 degrees in plane": (
        lambda c: (c.from_seg.label, in_ras(c, _rotation_z(2))),
        {},
        R.LABEL_SIZE_MISMATCH,
        "axes are tilted against the series'",
    ),
    "no orientation": (
        lambda c: (c.from_seg.label, in_ras(c)),
        {"oriented": False},
        R.MISSING_GEOMETRY,
        "no orientation",
    ),
    "an image, not a mask": (
        lambda c: (c.from_seg.image_hu.astype(np.int16), in_ras(c)),
        {},
        R.UNSUPPORTED_MODALITY,
        "an image, not a label mask",
    ),
    "two masks in one file": (
        lambda c: (np.stack([c.from_seg.label] * 2, axis=-1), in_ras(c)),
        {},
        R.LABEL_SIZE_MISMATCH,
        "one 3-D mask per series",
    ),
}


@pytest.mark.parametrize("make, header, reason, words", BAD_MASKS.values(), ids=BAD_MASKS.keys())
def test_a_mask_that_does_not_fit_is_quarantined_with_its_reason(
    tmp_path, case, make, header, reason, words
) -> None:
    root = site_with_ct(tmp_path, case)
    data, affine = make(case)
    write_nifti(root / "case" / "label.nii.gz", data, affine, **header)

    result = ingest_site(root)

    entries = {entry.reason: entry for entry in result.quarantine}
    assert set(entries) == {reason, R.UNLABELLED_SERIES}
    assert entries[reason].path == "case/label.nii.gz"
    assert words.format(slice_mm=case.from_seg.spacing_mm[2]) in entries[reason].detail
    assert entries[R.UNLABELLED_SERIES].series_key == series_key(case.series_uid)
    assert result.patients == ()


def test_a_broken_nifti_file_is_undecodable(tmp_path, case) -> None:
    root = site_with_ct(tmp_path, case)
    (root / "case" / "label.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    reasons = {e.reason for e in ingest_site(root).quarantine}
    assert reasons == {R.UNDECODABLE_PIXELS, R.UNLABELLED_SERIES}


# --- which series a mask labels ------------------------------------------------------------------


def test_a_mask_in_a_folder_of_two_series_must_be_named_after_one(tmp_path, case) -> None:
    root = tmp_path / "data"
    shutil.copytree(case.ct, root / "study" / "CT")
    other = root / "study" / "CT-copy"
    copy_uid = generate_uid()
    for path in case.ct.iterdir():  # the same images re-exported as a second series
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = copy_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        other.mkdir(exist_ok=True)
        ds.save_as(other / path.name)
    data, affine = as_written(case, "columns, rows, slices")
    write_nifti(root / "study" / "label.nii.gz", data, affine)

    result = ingest_site(root)
    (entry,) = [e for e in result.quarantine if e.reason is R.LABEL_WITHOUT_SERIES]
    assert "holds 2 image series" in entry.detail and "<SeriesInstanceUID>.nii.gz" in entry.detail

    (root / "study" / "label.nii.gz").rename(root / "study" / f"{case.series_uid}.nii.gz")
    result = ingest_site(root)
    assert volumes(result) == [case.from_seg]
    assert {e.reason for e in result.quarantine} == {R.UNLABELLED_SERIES}  # the copy


def test_a_mask_beside_no_series_labels_nothing(tmp_path, case) -> None:
    root = site_with_ct(tmp_path, case)
    data, affine = as_written(case, "rows, columns, slices")
    write_nifti(root / "annotations" / "patient-7.nii.gz", data, affine)
    entries = {e.reason: e for e in ingest_site(root).quarantine}
    assert set(entries) == {R.LABEL_WITHOUT_SERIES, R.UNLABELLED_SERIES}
    assert "holds no image series" in entries[R.LABEL_WITHOUT_SERIES].detail


def test_a_seg_wins_over_a_mask_and_a_named_mask_over_one_found_by_folder(tmp_path, case) -> None:
    root = site_with_ct(tmp_path, case)
    data, affine = as_written(case, "rows, columns, slices")
    empty = np.zeros_like(data)
    write_nifti(root / "case" / "a-first-by-name.nii.gz", empty, affine)
    write_nifti(root / "case" / f"{case.series_uid}.nii.gz", data, affine)
    result = ingest_site(root)
    assert volumes(result) == [case.from_seg]  # the named mask, not the empty one
    (entry,) = result.quarantine
    assert (entry.path, entry.reason) == ("case/a-first-by-name.nii.gz", R.DUPLICATE_INSTANCE)

    shutil.copy(case.seg, root / "case" / "seg.dcm")
    result = ingest_site(root)
    assert volumes(result) == [case.from_seg]
    assert "case/seg.dcm" in result.used_files
    assert {e.reason for e in result.quarantine} == {R.DUPLICATE_INSTANCE}
    assert all("DICOM SEG case/seg.dcm" in e.detail for e in result.quarantine)


def test_a_mask_of_a_quarantined_series_says_so(tmp_path, case) -> None:
    root = site_with_ct(tmp_path, case)
    middle = sorted((root / "case" / "CT").iterdir())[10]
    middle.unlink()
    data, affine = as_written(case, "rows, columns, slices")
    write_nifti(root / "case" / "label.nii.gz", data, affine)
    entries = {e.reason: e for e in ingest_site(root).quarantine}
    assert set(entries) == {R.MISSING_SLICES, R.LABEL_WITHOUT_SERIES}
    assert "which was quarantined (missing_slices)" in entries[R.LABEL_WITHOUT_SERIES].detail


# --- cache ---------------------------------------------------------------------------------------


def test_a_changed_mask_is_read_again_and_an_unchanged_one_comes_from_the_cache(
    tmp_path, case
) -> None:
    root, cache = site_with_ct(tmp_path, case), tmp_path / "cache"
    data, affine = as_written(case, "columns, rows, slices")
    mask = write_nifti(root / "case" / "label.nii.gz", data, affine)
    first = ingest_site(root, cache_dir=cache)
    second = ingest_site(root, cache_dir=cache)
    assert (first.cache_hits, second.cache_hits) == (0, 1)
    assert volumes(second) == volumes(first) == [case.from_seg]

    write_nifti(mask, np.zeros_like(data), affine)
    third = ingest_site(root, cache_dir=cache)
    assert third.cache_hits == 0
    (volume,) = volumes(third)
    assert not volume.label.any()
    np.testing.assert_array_equal(volume.image_hu, case.from_seg.image_hu)
