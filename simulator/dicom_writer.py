"""Write synthetic volumes as real DICOM: CT (or MR) Image Storage series and a lesion SEG.

Every UID and timestamp comes from the caller or is derived from its UIDs, so the same inputs
give byte-identical files. Volumes are (rows, cols, slices), slice k at z = origin + k * spacing.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import highdicom
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from simulator.dicom_slice_encoder import SliceEncoder
from simulator.site_profiles import RescaleConvention

logger = logging.getLogger(__name__)

# LPS axial: rows run along +x (patient left), columns down +y (posterior).
AXIAL_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

_SEG_MANUFACTURER = "fedseg"
_SEG_MODEL = "synthetic annotator"
_SEG_SOFTWARE_VERSION = "0.1.0"
_SEG_SERIES_NUMBER = 300


def deterministic_uid(*parts: object) -> UID:
    """A DICOM UID that depends only on `parts` (stringified), so reruns reproduce it."""
    return generate_uid(entropy_srcs=["fedseg-simulator", *(str(part) for part in parts)])


@dataclass(frozen=True, kw_only=True)
class PatientIdentity:
    """A synthetic patient as DICOM names them. Never written anywhere but the DICOM files.

    Attributes:
        name: DICOM PN, "FAMILY^GIVEN".
        patient_id: medical record number.
        birth_date: date of birth.
        sex: "F" or "M".
        age_years: age at the study date, whole years.
    """

    name: str
    patient_id: str
    birth_date: datetime.date
    sex: str
    age_years: int


@dataclass(frozen=True, kw_only=True)
class Study:
    """Study-level attributes shared by every series of one patient visit."""

    study_uid: str
    frame_of_reference_uid: str
    date: datetime.date
    time: datetime.time
    accession_number: str
    study_id: str
    description: str = "CT ABDOMEN WITH CONTRAST"
    referring_physician_name: str = ""


@dataclass(frozen=True, kw_only=True)
class Equipment:
    """The device that produced a series, as DICOM names it."""

    manufacturer: str
    model_name: str
    institution_name: str


@dataclass(frozen=True, kw_only=True)
class SeriesGeometry:
    """Axial slice stack geometry in mm (LPS patient coordinates).

    Attributes:
        pixel_spacing_mm: in-plane pixel size (rows and columns), mm.
        slice_thickness_mm: nominal slice thickness = distance between slice centres, mm.
        origin_mm: ImagePositionPatient (x, y, z) of the first voxel of slice 0, mm.
    """

    pixel_spacing_mm: float
    slice_thickness_mm: float
    origin_mm: tuple[float, float, float]

    @classmethod
    def centred(
        cls,
        *,
        shape: tuple[int, int, int],
        pixel_spacing_mm: float,
        slice_thickness_mm: float,
        table_z_mm: float = 0.0,
    ) -> SeriesGeometry:
        """Geometry of a (rows, cols, slices) volume centred on (0, 0, table_z_mm)."""
        rows, cols, slices = shape
        return cls(
            pixel_spacing_mm=pixel_spacing_mm,
            slice_thickness_mm=slice_thickness_mm,
            origin_mm=(
                -(cols - 1) / 2 * pixel_spacing_mm,
                -(rows - 1) / 2 * pixel_spacing_mm,
                table_z_mm - (slices - 1) / 2 * slice_thickness_mm,
            ),
        )

    def position_mm(self, slice_index: int) -> tuple[float, float, float]:
        """ImagePositionPatient of slice `slice_index`, rounded to 1e-4 mm."""
        x, y, z = self.origin_mm
        return (
            round(x, 4),
            round(y, 4),
            round(z + slice_index * self.slice_thickness_mm, 4),
        )


@dataclass(frozen=True, kw_only=True)
class ImageSeries:
    """What one image series says about itself, independent of its pixels."""

    patient: PatientIdentity
    study: Study
    equipment: Equipment
    geometry: SeriesGeometry
    series_uid: str
    series_number: int
    description: str
    transfer_syntax_uid: str = str(ExplicitVRLittleEndian)

    def sop_instance_uid(self, slice_index: int) -> UID:
        """UID of slice `slice_index` (0-based), derived from the series UID."""
        return deterministic_uid(self.series_uid, "instance", slice_index)


@dataclass(frozen=True, kw_only=True)
class CtAcquisition:
    """CT-specific acquisition and storage settings."""

    kvp: float
    rescale: RescaleConvention
    window_center_hu: float = 40.0
    window_width_hu: float = 400.0


@dataclass(frozen=True, kw_only=True)
class WrittenSeries:
    """The files of one series, in slice order, and the datasets written to them."""

    paths: tuple[Path, ...]
    datasets: tuple[Dataset, ...] = field(repr=False)


def write_ct_series(
    *, hu: np.ndarray, series: ImageSeries, acquisition: CtAcquisition, out_dir: Path
) -> WrittenSeries:
    """Write a CT Image Storage series, one file per slice: `out_dir/slice-NNN.dcm` (NNN from 1).

    Args:
        hu: (rows, cols, slices) volume in HU; slice k sits at `series.geometry.position_mm(k)`.
        series: identity, study, equipment, geometry and UIDs of the series.
        acquisition: kVp and how HU are stored (rescale convention).
        out_dir: folder to create and fill.

    Stored pixels are round((HU - intercept) / slope), clipped to what the storage can hold.
    """
    storage = _STORAGE[acquisition.rescale]
    stored = _stored_ct_pixels(hu, storage)
    template = _image_dataset(series, slice_index=0, sop_class_uid=CTImageStorage, modality="CT")
    template.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    template.KVP = acquisition.kvp
    template.AcquisitionNumber = 1
    template.RescaleIntercept = storage.intercept
    template.RescaleSlope = 1
    template.RescaleType = "HU"
    template.WindowCenter = acquisition.window_center_hu
    template.WindowWidth = acquisition.window_width_hu
    _set_pixels(template, stored[:, :, 0], bits_stored=storage.bits_stored, signed=storage.signed)
    written = _write_slices(template, series=series, stored=stored, out_dir=out_dir)
    logger.debug("wrote CT series of %d slices to %s", len(written.paths), out_dir)
    return written


def write_mr_series(*, intensity: np.ndarray, series: ImageSeries, out_dir: Path) -> WrittenSeries:
    """Write an MR Image Storage series (1.5 T T1 gradient echo), one file per slice.

    Args:
        intensity: (rows, cols, slices) unitless MR signal, 0..4095.
        series: identity, study, equipment, geometry and UIDs of the series.
        out_dir: folder to create and fill (`slice-NNN.dcm`).
    """
    stored = np.clip(np.rint(intensity), 0, 4095).astype("<u2")
    template = _image_dataset(series, slice_index=0, sop_class_uid=MRImageStorage, modality="MR")
    template.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    template.ScanningSequence = "GR"
    template.SequenceVariant = "SP"
    template.ScanOptions = ""
    template.MRAcquisitionType = "2D"
    template.RepetitionTime = 150.0
    template.EchoTime = 4.6
    template.EchoTrainLength = 1
    template.FlipAngle = 70.0
    template.MagneticFieldStrength = 1.5
    template.ImagedNucleus = "1H"
    template.AcquisitionNumber = 1
    _set_pixels(template, stored[:, :, 0], bits_stored=12, signed=False)
    written = _write_slices(template, series=series, stored=stored, out_dir=out_dir)
    logger.debug("wrote MR series of %d slices to %s", len(written.paths), out_dir)
    return written


def write_lesion_seg(
    *,
    mask: np.ndarray,
    source_images: Sequence[Dataset],
    series_uid: str,
    content_datetime: datetime.datetime,
    out_path: Path,
) -> Dataset:
    """Write a binary DICOM SEG with one segment, "lesion", drawn manually on the source series.

    Args:
        mask: (rows, cols, slices) binary lesion mask; slice k belongs to `source_images[k]`.
            An all-zero mask still gives one (empty) frame per source slice.
        source_images: the CT datasets of the referenced series, in slice order.
        series_uid: SeriesInstanceUID of the SEG; its SOPInstanceUID and the dimension
            organisation UID are derived from it.
        content_datetime: when the annotation was made (stamped instead of the clock).
        out_path: file to write.
    """
    if mask.shape[2] != len(source_images):
        raise ValueError(
            f"mask: expected {len(source_images)} slices (one per source image), "
            f"got shape {mask.shape}"
        )
    segment = highdicom.seg.SegmentDescription(
        segment_number=1,
        segment_label="lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=highdicom.seg.SegmentAlgorithmTypeValues.MANUAL,
        anatomic_regions=[codes.SCT.Liver],
    )
    seg = highdicom.seg.Segmentation(
        source_images=list(source_images),
        pixel_array=np.ascontiguousarray(np.moveaxis(mask.astype(bool), 2, 0)),
        segmentation_type=highdicom.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=series_uid,
        series_number=_SEG_SERIES_NUMBER,
        sop_instance_uid=deterministic_uid(series_uid, "seg"),
        instance_number=1,
        manufacturer=_SEG_MANUFACTURER,
        manufacturer_model_name=_SEG_MODEL,
        software_versions=_SEG_SOFTWARE_VERSION,
        device_serial_number="0",
        series_description="lesion annotation",
        omit_empty_frames=False,
        content_date=content_datetime.date(),
        content_time=content_datetime.time(),
        series_date=content_datetime.date(),
        series_time=content_datetime.time(),
    )
    # highdicom stamps creation and contribution times from the clock and draws a random
    # dimension organisation UID; pin them so a rerun with the same seed writes the same bytes.
    seg.InstanceCreationDate = content_datetime.strftime("%Y%m%d")
    seg.InstanceCreationTime = content_datetime.strftime("%H%M%S")
    for item in seg.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = content_datetime.strftime("%Y%m%d%H%M%S")
    dimension_uid = deterministic_uid(series_uid, "dimension-organization")
    for item in seg.DimensionOrganizationSequence:
        item.DimensionOrganizationUID = dimension_uid
    for item in seg.DimensionIndexSequence:
        item.DimensionOrganizationUID = dimension_uid
    out_path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(out_path, enforce_file_format=True)
    logger.debug("wrote SEG with %d frames to %s", int(seg.NumberOfFrames), out_path)
    return seg


def _image_dataset(
    series: ImageSeries, *, slice_index: int, sop_class_uid: str, modality: str
) -> Dataset:
    """Patient, study, series, equipment, frame of reference and plane modules of one slice."""
    patient, study, geometry = series.patient, series.study, series.geometry
    sop_instance_uid = series.sop_instance_uid(slice_index)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = series.transfer_syntax_uid

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.Modality = modality

    study_date = study.date.strftime("%Y%m%d")
    study_time = study.time.strftime("%H%M%S")
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = study_time
    ds.AccessionNumber = study.accession_number
    ds.ReferringPhysicianName = study.referring_physician_name
    ds.StudyDescription = study.description
    ds.SeriesDescription = series.description
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = series.series_uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = series.series_number
    ds.InstanceNumber = slice_index + 1

    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date.strftime("%Y%m%d")
    ds.PatientSex = patient.sex
    ds.PatientAge = f"{patient.age_years:03d}Y"
    ds.PatientPosition = "HFS"
    ds.BodyPartExamined = "ABDOMEN"

    ds.Manufacturer = series.equipment.manufacturer
    ds.ManufacturerModelName = series.equipment.model_name
    ds.InstitutionName = series.equipment.institution_name

    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    position = geometry.position_mm(slice_index)
    ds.ImagePositionPatient = list(position)
    ds.ImageOrientationPatient = list(AXIAL_ORIENTATION)
    ds.PixelSpacing = [geometry.pixel_spacing_mm, geometry.pixel_spacing_mm]
    ds.SliceThickness = geometry.slice_thickness_mm
    ds.SpacingBetweenSlices = geometry.slice_thickness_mm
    ds.SliceLocation = position[2]
    ds.BurnedInAnnotation = "NO"
    return ds


@dataclass(frozen=True)
class _PixelStorage:
    """How one rescale convention lays HU out in 16-bit words."""

    intercept: int
    bits_stored: int
    signed: bool

    @property
    def stored_range(self) -> tuple[int, int]:
        if self.signed:
            return (-(2 ** (self.bits_stored - 1)), 2 ** (self.bits_stored - 1) - 1)
        return (0, 2**self.bits_stored - 1)


_STORAGE = {
    RescaleConvention.UNSIGNED_OFFSET: _PixelStorage(intercept=-1024, bits_stored=12, signed=False),
    RescaleConvention.SIGNED: _PixelStorage(intercept=0, bits_stored=16, signed=True),
}


def _stored_ct_pixels(hu: np.ndarray, storage: _PixelStorage) -> np.ndarray:
    """Stored values (rows, cols, slices): round(HU - intercept) (slope 1), clipped to range."""
    low, high = storage.stored_range
    stored = np.clip(np.rint(hu.astype(np.float64) - storage.intercept), low, high)
    return stored.astype("<i2" if storage.signed else "<u2")


def _set_pixels(ds: Dataset, frame: np.ndarray, *, bits_stored: int, signed: bool) -> None:
    """Image Pixel module for one (rows, cols) monochrome frame."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = frame.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = np.ascontiguousarray(frame).tobytes()


def _write_slices(
    template: Dataset, *, series: ImageSeries, stored: np.ndarray, out_dir: Path
) -> WrittenSeries:
    """One file per slice of `stored` (rows, cols, slices), differing only where slices do."""
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder = SliceEncoder(template)
    paths, datasets = [], []
    for k in range(stored.shape[2]):
        position = series.geometry.position_mm(k)
        ds = encoder.slice_dataset(
            sop_instance_uid=series.sop_instance_uid(k),
            instance_number=k + 1,
            position_mm=position,
            pixels=np.ascontiguousarray(stored[:, :, k]).tobytes(),
        )
        path = out_dir / f"slice-{k + 1:03d}.dcm"
        path.write_bytes(encoder.encode(ds))
        paths.append(path)
        datasets.append(ds)
    return WrittenSeries(paths=tuple(paths), datasets=tuple(datasets))
