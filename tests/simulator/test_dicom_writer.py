"""DICOM writer round trips: CT series and lesion SEG read back with strict validation."""

from __future__ import annotations

import datetime
import hashlib
import io
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import highdicom
import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    SegmentationStorage,
)

from simulator.dicom_writer import (
    CtAcquisition,
    Equipment,
    ImageSeries,
    PatientIdentity,
    SeriesGeometry,
    Study,
    WrittenSeries,
    deterministic_uid,
    write_ct_series,
    write_lesion_seg,
    write_mr_series,
)
from simulator.phantom import PhantomSpec, make_phantom
from simulator.site_profiles import RescaleConvention

SHAPE = (32, 32, 8)
PIXEL_MM = 11.25
SLICE_MM = 2.5
ANNOTATED = datetime.datetime(2021, 6, 2, 14, 30)


@pytest.fixture(autouse=True)
def strict_dicom() -> Iterator[None]:
    """Read and write with validation errors raised, as a picky PACS would."""
    settings = pydicom.config.settings
    saved = (settings.reading_validation_mode, settings.writing_validation_mode)
    settings.reading_validation_mode = pydicom.config.RAISE
    settings.writing_validation_mode = pydicom.config.RAISE
    yield
    settings.reading_validation_mode, settings.writing_validation_mode = saved


@pytest.fixture(scope="module")
def phantom():
    spec = PhantomSpec(
        rows=SHAPE[0],
        cols=SHAPE[1],
        slices=SHAPE[2],
        pixel_spacing_mm=PIXEL_MM,
        slice_spacing_mm=SLICE_MM,
        noise_sigma_hu=12.0,
        lesion_count=1,
        lesion_radius_mm=(20.0, 30.0),
    )
    return make_phantom(spec, rng=np.random.default_rng(0))


def _series(*, transfer_syntax_uid: str = ExplicitVRLittleEndian, tag: str = "a") -> ImageSeries:
    return ImageSeries(
        patient=PatientIdentity(
            name="TESTER^ANNA",
            patient_id="H1000001",
            birth_date=datetime.date(1975, 3, 9),
            sex="F",
            age_years=46,
        ),
        study=Study(
            study_uid=deterministic_uid(tag, "study"),
            frame_of_reference_uid=deterministic_uid(tag, "for"),
            date=datetime.date(2021, 5, 30),
            time=datetime.time(9, 15, 0),
            accession_number="A123456789",
            study_id="4711",
        ),
        equipment=Equipment(
            manufacturer="SIEMENS", model_name="SOMATOM Definition AS", institution_name="H1"
        ),
        geometry=SeriesGeometry.centred(
            shape=SHAPE, pixel_spacing_mm=PIXEL_MM, slice_thickness_mm=SLICE_MM, table_z_mm=-300.0
        ),
        series_uid=deterministic_uid(tag, "series"),
        series_number=2,
        description="ABDOMEN",
        transfer_syntax_uid=str(transfer_syntax_uid),
    )


def _write_ct(
    phantom, out_dir: Path, *, rescale: RescaleConvention, transfer_syntax_uid: str
) -> WrittenSeries:
    return write_ct_series(
        hu=phantom.hu,
        series=_series(transfer_syntax_uid=transfer_syntax_uid),
        acquisition=CtAcquisition(kvp=120.0, rescale=rescale),
        out_dir=out_dir,
    )


@pytest.mark.parametrize("rescale", list(RescaleConvention))
@pytest.mark.parametrize("transfer_syntax_uid", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_ct_series_round_trips_geometry_hu_and_uids(
    tmp_path: Path, phantom, rescale: RescaleConvention, transfer_syntax_uid: str
) -> None:
    written = _write_ct(phantom, tmp_path, rescale=rescale, transfer_syntax_uid=transfer_syntax_uid)
    assert [p.name for p in written.paths] == [f"slice-{k:03d}.dcm" for k in range(1, 9)]

    slices = [pydicom.dcmread(path) for path in written.paths]
    first = slices[0]
    assert first.file_meta.TransferSyntaxUID == transfer_syntax_uid
    assert first.file_meta.MediaStorageSOPClassUID == CTImageStorage
    assert {ds.SOPClassUID for ds in slices} == {CTImageStorage}
    assert {ds.Modality for ds in slices} == {"CT"}
    for attribute in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({ds[attribute].value for ds in slices}) == 1, attribute
    assert len({ds.SOPInstanceUID for ds in slices}) == len(slices)
    assert all(ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID for ds in slices)
    assert [ds.InstanceNumber for ds in slices] == list(range(1, 9))

    orientation = np.array(first.ImageOrientationPatient, dtype=float)
    assert orientation.tolist() == [1, 0, 0, 0, 1, 0]
    normal = np.cross(orientation[:3], orientation[3:])
    along_normal = [np.dot(normal, np.array(ds.ImagePositionPatient, dtype=float)) for ds in slices]
    assert np.allclose(np.diff(along_normal), SLICE_MM, atol=1e-3)
    assert [float(v) for v in first.PixelSpacing] == [PIXEL_MM, PIXEL_MM]
    assert float(first.SliceThickness) == float(first.SpacingBetweenSlices) == SLICE_MM
    assert (first.Rows, first.Columns) == SHAPE[:2]

    hu = np.stack(
        [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices],
        axis=2,
    )
    assert np.max(np.abs(hu - phantom.hu)) <= 0.5
    assert first.RescaleType == "HU"
    assert first.PixelRepresentation == (1 if rescale is RescaleConvention.SIGNED else 0)


@pytest.mark.parametrize("rescale", list(RescaleConvention))
@pytest.mark.parametrize("transfer_syntax_uid", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_slice_files_are_what_pydicom_writes_for_their_datasets(
    tmp_path: Path, phantom, rescale: RescaleConvention, transfer_syntax_uid: str
) -> None:
    ct = _write_ct(
        phantom, tmp_path / "CT", rescale=rescale, transfer_syntax_uid=transfer_syntax_uid
    )
    mr = write_mr_series(
        intensity=np.clip(phantom.hu + 1024.0, 0, 4095),
        series=_series(transfer_syntax_uid=transfer_syntax_uid),
        out_dir=tmp_path / "MR",
    )
    for written in (ct, mr):
        for path, dataset in zip(written.paths, written.datasets, strict=True):
            reference = io.BytesIO()
            dataset.save_as(reference, enforce_file_format=True)
            assert path.read_bytes() == reference.getvalue(), path


def test_ct_slice_carries_the_identity_and_study_attributes(tmp_path: Path, phantom) -> None:
    written = _write_ct(
        phantom,
        tmp_path,
        rescale=RescaleConvention.UNSIGNED_OFFSET,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    ds = pydicom.dcmread(written.paths[0])
    assert str(ds.PatientName) == "TESTER^ANNA"
    assert ds.PatientAge == "046Y"
    assert ds.PatientBirthDate == "19750309"
    assert ds.StudyDate == ds.SeriesDate == ds.ContentDate == "20210530"
    assert ds.PatientPosition == "HFS"
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    for keyword in (
        "AccessionNumber",
        "StudyID",
        "ReferringPhysicianName",
        "PositionReferenceIndicator",
        "KVP",
        "AcquisitionNumber",
        "WindowCenter",
        "WindowWidth",
        "Manufacturer",
        "ManufacturerModelName",
        "SliceLocation",
    ):
        assert keyword in ds, keyword


def test_mr_series_is_mr_image_storage(tmp_path: Path, phantom) -> None:
    written = write_mr_series(
        intensity=np.clip(phantom.hu + 1024.0, 0, 4095), series=_series(), out_dir=tmp_path
    )
    ds = pydicom.dcmread(written.paths[0])
    assert ds.SOPClassUID == MRImageStorage
    assert ds.Modality == "MR"
    assert "RescaleIntercept" not in ds


@pytest.mark.parametrize("empty", [False, True], ids=["lesion", "no-lesion"])
def test_seg_references_the_series_and_round_trips_the_mask(
    tmp_path: Path, phantom, empty: bool
) -> None:
    ct = _write_ct(
        phantom,
        tmp_path / "CT",
        rescale=RescaleConvention.SIGNED,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    mask = np.zeros_like(phantom.lesion_mask) if empty else phantom.lesion_mask
    assert empty or mask.any()
    seg_path = tmp_path / "SEG" / "seg.dcm"
    write_lesion_seg(
        mask=mask,
        source_images=ct.datasets,
        series_uid=deterministic_uid("seg"),
        content_datetime=ANNOTATED,
        out_path=seg_path,
    )

    seg = highdicom.seg.segread(seg_path)
    assert seg.SOPClassUID == SegmentationStorage
    assert seg.SegmentationType == "BINARY"
    assert seg.SegmentSequence[0].SegmentLabel == "lesion"
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "MANUAL"
    ct_series_uid = ct.datasets[0].SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct_series_uid
    assert seg.FrameOfReferenceUID == ct.datasets[0].FrameOfReferenceUID
    source_uids = [ds.SOPInstanceUID for ds in ct.datasets]
    referenced = [uid for _, _, uid in seg.get_source_image_uids()]
    assert sorted(referenced) == sorted(source_uids)
    assert int(seg.NumberOfFrames) == SHAPE[2]

    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=source_uids, segment_numbers=[1]
    )
    assert np.array_equal(pixels[..., 0], np.moveaxis(mask, 2, 0))
    assert seg.ContentDate == "20210602"


def test_seg_is_byte_identical_when_written_twice(tmp_path: Path, phantom) -> None:
    ct = _write_ct(
        phantom,
        tmp_path / "CT",
        rescale=RescaleConvention.SIGNED,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    digests = []
    for name in ("first.dcm", "second.dcm"):
        write_lesion_seg(
            mask=phantom.lesion_mask,
            source_images=ct.datasets,
            series_uid=deterministic_uid("seg"),
            content_datetime=ANNOTATED,
            out_path=tmp_path / name,
        )
        digests.append(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_seg_with_the_wrong_number_of_slices_is_refused(tmp_path: Path, phantom) -> None:
    ct = _write_ct(
        phantom,
        tmp_path / "CT",
        rescale=RescaleConvention.SIGNED,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    with pytest.raises(ValueError, match="mask: expected 7 slices"):
        write_lesion_seg(
            mask=phantom.lesion_mask,
            source_images=ct.datasets[:-1],
            series_uid=deterministic_uid("seg"),
            content_datetime=ANNOTATED,
            out_path=tmp_path / "seg.dcm",
        )


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_dciodvfy_finds_no_errors_in_ct_and_seg(tmp_path: Path, phantom) -> None:
    ct = _write_ct(
        phantom,
        tmp_path / "CT",
        rescale=RescaleConvention.UNSIGNED_OFFSET,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    seg_path = tmp_path / "seg.dcm"
    write_lesion_seg(
        mask=phantom.lesion_mask,
        source_images=ct.datasets,
        series_uid=deterministic_uid("seg"),
        content_datetime=ANNOTATED,
        out_path=seg_path,
    )
    for path in (ct.paths[0], seg_path):
        result = subprocess.run(
            ["dciodvfy", str(path)], capture_output=True, text=True, check=False
        )
        errors = [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]
        assert errors == [], f"{path.name}: {errors}"
