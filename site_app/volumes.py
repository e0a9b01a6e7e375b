"""What ingestion hands on: one labelled CT volume (`LabelledVolume`), and one patient's volumes
(`PatientRecord`, the unit of differential privacy).

Arrays are (rows, cols, slices): HU float32, label uint8; geometry in mm (DICOM LPS), as
`site_app.geometry.SeriesGrid` describes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["LabelledVolume", "PatientRecord", "frozen_volume"]


@dataclass(frozen=True, eq=False)
class LabelledVolume:
    """One CT series with its lesion label, ready for training.

    ``image_hu`` is float32 (rows, cols, slices) in Hounsfield units (RescaleSlope/Intercept
    applied per slice); ``label`` is uint8 of the same shape, 1 = lesion (any non-zero segment of
    the SEG, or any non-zero voxel of the NIfTI mask, placed on the same grid). Slices ascend
    along the slice normal (row cosine x column cosine). ``spacing_mm`` is (row spacing, column
    spacing, slice spacing); ``orientation`` the 6 ImageOrientationPatient cosines;
    ``origin_mm`` the ImagePositionPatient of the first slice. Arrays are read-only. Equality
    compares array contents.
    """

    series_key: str
    image_hu: np.ndarray = field(repr=False)
    label: np.ndarray = field(repr=False)
    spacing_mm: tuple[float, float, float]
    orientation: tuple[float, ...]
    origin_mm: tuple[float, float, float]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LabelledVolume):
            return NotImplemented
        return (
            self.series_key == other.series_key
            and self.spacing_mm == other.spacing_mm
            and self.orientation == other.orientation
            and self.origin_mm == other.origin_mm
            and self.image_hu.dtype == other.image_hu.dtype
            and np.array_equal(self.image_hu, other.image_hu)
            and self.label.dtype == other.label.dtype
            and np.array_equal(self.label, other.label)
        )


def frozen_volume(
    key: str,
    image: np.ndarray,
    label: np.ndarray,
    spacing: Sequence[float],
    orientation: Sequence[float],
    origin: Sequence[float],
) -> LabelledVolume:
    """A `LabelledVolume` holding read-only contiguous copies (float32 HU, uint8 label) and the
    geometry as plain float tuples."""
    image = np.ascontiguousarray(image, dtype=np.float32)
    label = np.ascontiguousarray(label, dtype=np.uint8)
    image.flags.writeable = False
    label.flags.writeable = False
    return LabelledVolume(
        series_key=key,
        image_hu=image,
        label=label,
        spacing_mm=tuple(float(v) for v in spacing),  # type: ignore[arg-type]
        orientation=tuple(float(v) for v in orientation),
        origin_mm=tuple(float(v) for v in origin),  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class PatientRecord:
    """All usable labelled series of one patient: the unit of differential privacy.

    ``patient_key`` is a local pseudonym (``"p-"`` + sha256(PatientID)[:12]); like the ID it must
    never leave the site. ``sex`` ("M", "F", "O" or None), ``age_years``, ``manufacturer`` and
    ``slice_thickness_mm`` come from the first volume (by series_key); files without a PatientID
    all share one record, which over- rather than under-states what one person contributes.
    """

    patient_key: str
    volumes: tuple[LabelledVolume, ...]
    sex: str | None
    age_years: int | None
    manufacturer: str | None
    slice_thickness_mm: float | None
