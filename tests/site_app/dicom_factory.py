"""Test-only writers of tiny but valid DICOM: CT slices (pydicom) and SEG labels (highdicom).

Every knob is a keyword so a test can break exactly one thing and keep the rest valid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sr.codedict import codes
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    MRImageStorage,
    generate_uid,
)

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SOP_CLASS_BY_MODALITY = {"CT": CTImageStorage, "MR": MRImageStorage}


@dataclass(frozen=True)
class Patient:
    """Demographics written into every file; distinctive defaults make PHI leaks easy to grep."""

    name: str = "ZZTESTNAME^UNIQUE"
    patient_id: str = "ID-987654321"
    birth_date: str = "19010203"
    sex: str = "F"
    age: str = "045Y"


@dataclass(frozen=True)
class WrittenSeries:
    """What `write_ct_series` wrote; `expected_hu` is (rows, cols, slices) by ascending z."""

    files: list[Path]  # in ascending slice position
    series_uid: str
    sop_uids: list[str]  # in ascending slice position
    expected_hu: np.ndarray
    spacing: tuple[float, float, float]
    extra: dict = field(default_factory=dict)


def _ct_dataset(
    *,
    patient: Patient,
    study_uid: str,
    series_uid: str,
    frame_of_reference_uid: str,
    sop_uid: str,
    modality: str,
    instance_number: int,
    position: Sequence[float],
    orientation: Sequence[float],
    pixel_spacing: tuple[float, float],
    slice_thickness: float,
    stored: np.ndarray,
    slope: float,
    intercept: float,
    manufacturer: str,
) -> Dataset:
    sop_class = SOP_CLASS_BY_MODALITY[modality]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.Modality = modality
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.PatientAge = patient.age
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20200102"
    ds.StudyTime = "101010"
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC-555"
    ds.ReferringPhysicianName = "REFDOC^ZZ"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = manufacturer
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(v) for v in pixel_spacing]
    ds.SliceThickness = float(slice_thickness)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.RescaleType = "HU"
    ds.KVP = 120
    ds.PixelData = stored.astype("<i2").tobytes()
    return ds


def write_ct_series(
    directory: Path,
    *,
    n_slices: int = 8,
    rows: int = 16,
    cols: int = 16,
    spacing: tuple[float, float, float] = (0.8, 0.9, 2.5),
    modality: str = "CT",
    orientation: Sequence[float] = AXIAL,
    origin: tuple[float, float, float] = (-10.0, -20.0, 30.0),
    positions_z: Sequence[float] | None = None,
    patient: Patient = Patient(),
    series_uid: str | None = None,
    slope: float = 1.0,
    intercept: float = -1024.0,
    manufacturer: str = "ACME Medical",
    seed: int = 0,
    name_pattern: str = "slice_{index:03d}.dcm",
    file_order: Sequence[int] | None = None,
    mutate: Callable[[int, Dataset], None] | None = None,
) -> WrittenSeries:
    """Write one single-frame series, one file per slice, into ``directory``.

    Slices lie at ``origin + k * spacing[2]`` along the slice normal (or at ``positions_z``).
    ``file_order[k]`` is the file-name index of slice k (e.g. reversed, to check sorting).
    ``mutate(k, ds)`` may change slice k's dataset just before it is written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid, for_uid = generate_uid(), generate_uid()
    series_uid = series_uid or generate_uid()
    row_cos, col_cos = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row_cos, col_cos)
    zs = list(positions_z) if positions_z is not None else [k * spacing[2] for k in range(n_slices)]
    order = list(file_order) if file_order is not None else list(range(len(zs)))
    stored = rng.integers(0, 2000, size=(rows, cols, len(zs)), dtype=np.int16)
    files, sop_uids = [], []
    for k, z in enumerate(zs):
        sop_uid = generate_uid()
        ds = _ct_dataset(
            patient=patient,
            study_uid=study_uid,
            series_uid=series_uid,
            frame_of_reference_uid=for_uid,
            sop_uid=sop_uid,
            modality=modality,
            instance_number=k + 1,
            position=np.array(origin) + z * normal,
            orientation=orientation,
            pixel_spacing=(spacing[0], spacing[1]),
            slice_thickness=spacing[2],
            stored=stored[:, :, k],
            slope=slope,
            intercept=intercept,
            manufacturer=manufacturer,
        )
        if mutate is not None:
            mutate(k, ds)
        path = directory / name_pattern.format(index=order[k])
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        sop_uids.append(sop_uid)
    hu = (stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)).astype(np.float32)
    return WrittenSeries(files, series_uid, sop_uids, hu, spacing)


def default_mask(series: WrittenSeries) -> np.ndarray:
    """A small cube lesion in the middle of the volume, (rows, cols, slices) uint8."""
    rows, cols, n = series.expected_hu.shape
    mask = np.zeros((rows, cols, n), dtype=np.uint8)
    mask[rows // 4 : rows // 2, cols // 4 : cols // 2, n // 4 : n // 2 + 1] = 1
    return mask


def write_seg(
    path: Path,
    series: WrittenSeries,
    mask: np.ndarray | None = None,
    *,
    frame_shape: tuple[int, int] | None = None,
    source_files: Sequence[Path] | None = None,
) -> Path:
    """Write a binary DICOM SEG over ``series`` with ``mask`` (rows, cols, slices; slice order as
    ``series.files``). ``frame_shape`` pretends the source slices had another size (to build a
    label that does not fit); ``source_files`` builds the SEG over other files than the series.
    """
    sources = [dcmread(f) for f in (source_files or series.files)]
    if mask is None:
        mask = default_mask(series)
    if frame_shape is not None:
        for ds in sources:
            ds.Rows, ds.Columns = frame_shape
        mask = np.zeros((*frame_shape, len(sources)), dtype=np.uint8)
        mask[: frame_shape[0] // 2, : frame_shape[1] // 2, len(sources) // 2] = 1
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=np.moveaxis(mask, -1, 0).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=generate_uid(),
        series_number=100,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="Test Labels",
        manufacturer_model_name="dicom_factory",
        software_versions="1",
        device_serial_number="0",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path


def write_labelled_series(
    directory: Path, *, mask: np.ndarray | None = None, **ct_kwargs
) -> tuple[WrittenSeries, Path]:
    """A CT series in ``directory/ct`` plus its SEG at ``directory/seg.dcm``."""
    series = write_ct_series(directory / "ct", **ct_kwargs)
    seg_path = write_seg(directory / "seg.dcm", series, mask)
    return series, seg_path


def write_undecodable_ct(directory: Path, **ct_kwargs) -> WrittenSeries:
    """A CT series whose files claim JPEG Baseline but hold garbage bytes as the frame."""

    def to_garbage_jpeg(_: int, ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = encapsulate([b"\xff\xd8 this is not a JPEG stream \xff\xd9"])
        ds["PixelData"].VR = "OB"

    return write_ct_series(directory, mutate=to_garbage_jpeg, **ct_kwargs)
