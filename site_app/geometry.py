"""Where a series' voxels lie in the patient: the slice normal and the voxel -> LPS mm affine.

One definition for every place that needs it (validation orders slices along `slice_normal`;
training, inference and NIfTI mask placement use `series_affine_lps`). Voxel indices are
(row, column, slice); patient coordinates are DICOM's LPS, in mm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

__all__ = ["SeriesGrid", "series_affine_lps", "slice_normal"]


class SeriesGrid(Protocol):
    """What places a volume: ``orientation`` the 6 ImageOrientationPatient cosines (row, then
    column), ``spacing_mm`` (row spacing, column spacing, slice spacing), ``origin_mm`` the
    ImagePositionPatient of the first slice. `SeriesGeometry` and `LabelledVolume` are ones."""

    @property
    def orientation(self) -> Sequence[float]: ...

    @property
    def spacing_mm(self) -> Sequence[float]: ...

    @property
    def origin_mm(self) -> Sequence[float]: ...


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal of the image plane: row cosine x column cosine, shape (3,)."""
    normal = np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:]))
    return normal / np.linalg.norm(normal)


def series_affine_lps(grid: SeriesGrid) -> np.ndarray:
    """Voxel (row, column, slice) -> patient LPS mm, (4, 4) float64.

    Moving down a row follows the column cosines, along a row the row cosines (DICOM C.7.6.2),
    from slice to slice the unit `slice_normal` (slices ascend along it).
    """
    orientation = tuple(grid.orientation)
    row_cosines = np.asarray(orientation[:3], dtype=np.float64)
    col_cosines = np.asarray(orientation[3:], dtype=np.float64)
    row_spacing, col_spacing, slice_spacing = grid.spacing_mm
    affine = np.eye(4)
    affine[:3, 0] = col_cosines * row_spacing
    affine[:3, 1] = row_cosines * col_spacing
    affine[:3, 2] = slice_normal(orientation) * slice_spacing
    affine[:3, 3] = grid.origin_mm
    return affine
