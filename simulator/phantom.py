"""Synthetic abdominal CT phantom in Hounsfield units, with a binary liver-lesion mask.

Pure numpy, no I/O: the same spec and generator state always give the same arrays. Arrays are
indexed (rows, cols, slices): rows run anterior→posterior, cols patient right→left, slices
inferior→superior (the LPS patient axes of an axial, head-first-supine CT).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

logger = logging.getLogger(__name__)

AIR_HU = -1000.0
LUNG_HU = -800.0
FAT_HU = -100.0
SOFT_TISSUE_HU = 40.0
LIVER_HU = 60.0
CANCELLOUS_BONE_HU = 400.0
CORTICAL_BONE_HU = 1000.0

# The clip matches what 12-bit unsigned storage with intercept -1024 can hold, so no site
# loses information that another keeps.
MIN_HU = -1024.0
MAX_HU = 3071.0


class Tissue(IntEnum):
    """Label of each voxel in `Phantom.tissue`."""

    AIR = 0
    FAT = 1
    SOFT_TISSUE = 2
    LUNG = 3
    LIVER = 4
    BONE = 5
    LESION = 6


@dataclass(frozen=True, kw_only=True)
class PhantomSpec:
    """Everything that shapes one synthetic patient volume.

    Attributes:
        rows: in-plane rows (anterior→posterior).
        cols: in-plane columns (patient right→left).
        slices: number of axial slices (inferior→superior).
        pixel_spacing_mm: in-plane voxel size in mm (square pixels).
        slice_spacing_mm: distance between slice centres in mm.
        noise_sigma_hu: standard deviation of the additive Gaussian noise, in HU.
        intensity_offset_hu: calibration offset added to every voxel, in HU.
        lesion_count: number of lesions to place in the liver (0 = healthy patient).
        lesion_radius_mm: (min, max) lesion radius in mm; each lesion draws its own.
        lesion_contrast_hu: lesion HU minus liver HU (negative = hypodense).
    """

    rows: int
    cols: int
    slices: int
    pixel_spacing_mm: float
    slice_spacing_mm: float
    noise_sigma_hu: float = 0.0
    intensity_offset_hu: float = 0.0
    lesion_count: int = 0
    lesion_radius_mm: tuple[float, float] = (10.0, 20.0)
    lesion_contrast_hu: float = -40.0

    def __post_init__(self) -> None:
        problems = []
        for name in ("rows", "cols", "slices"):
            if getattr(self, name) < 8:
                problems.append(f"{name}: expected an int >= 8, got {getattr(self, name)}")
        for name in ("pixel_spacing_mm", "slice_spacing_mm"):
            if not getattr(self, name) > 0:
                problems.append(f"{name}: expected mm > 0, got {getattr(self, name)}")
        if self.noise_sigma_hu < 0:
            problems.append(f"noise_sigma_hu: expected HU >= 0, got {self.noise_sigma_hu}")
        if self.lesion_count < 0:
            problems.append(f"lesion_count: expected an int >= 0, got {self.lesion_count}")
        low, high = self.lesion_radius_mm
        if not 0 < low <= high:
            problems.append(f"lesion_radius_mm: expected 0 < min <= max, got {(low, high)}")
        if problems:
            raise ValueError("PhantomSpec: " + "; ".join(problems))

    @property
    def shape(self) -> tuple[int, int, int]:
        """Volume shape (rows, cols, slices)."""
        return (self.rows, self.cols, self.slices)


@dataclass(frozen=True, kw_only=True)
class Phantom:
    """One synthetic patient.

    Attributes:
        hu: float32 (rows, cols, slices), Hounsfield units, noise and offset included.
        lesion_mask: uint8 (rows, cols, slices), 1 inside a lesion, else 0.
        tissue: uint8 (rows, cols, slices), a `Tissue` label per voxel (noise-free ground truth).
        organ_mask: bool (rows, cols, slices), the liver including its lesions.
        lesion_count: number of lesions placed (they may overlap).
    """

    hu: np.ndarray
    lesion_mask: np.ndarray
    tissue: np.ndarray
    organ_mask: np.ndarray
    lesion_count: int


def draw_lesion_count(*, prevalence: float, max_lesions: int, rng: np.random.Generator) -> int:
    """Draw how many lesions one patient has: 0 with probability 1 - prevalence, else 1..max."""
    if not 0.0 <= prevalence <= 1.0:
        raise ValueError(f"prevalence: expected a probability in [0, 1], got {prevalence}")
    if max_lesions < 1:
        raise ValueError(f"max_lesions: expected an int >= 1, got {max_lesions}")
    has_lesion = rng.random() < prevalence
    # Always draw the count so the generator advances the same way for healthy patients.
    count = int(rng.integers(1, max_lesions + 1))
    return count if has_lesion else 0


def make_phantom(spec: PhantomSpec, *, rng: np.random.Generator) -> Phantom:
    """Build one synthetic abdominal CT volume and its lesion mask.

    Anatomy is laid out in mm around the volume centre, so sites with a different field of view
    or slice thickness image the same body at a different resolution and coverage. Patient size,
    organ placement and lesion positions are drawn from `rng`.

    Returns:
        A `Phantom` whose arrays all have shape `spec.shape` = (rows, cols, slices).
    """
    y, x, z = _voxel_centres_mm(spec)
    body_x = rng.uniform(150.0, 175.0)
    body_y = rng.uniform(105.0, 125.0)
    fat_mm = rng.uniform(8.0, 20.0)

    tissue = np.full(spec.shape, Tissue.AIR, dtype=np.uint8)
    in_plane_body = _ellipse(x, y, centre=(0.0, 0.0), semi=(body_x, body_y))
    in_plane_core = _ellipse(x, y, centre=(0.0, 0.0), semi=(body_x - fat_mm, body_y - fat_mm))
    tissue[np.broadcast_to(in_plane_body, spec.shape)] = Tissue.FAT
    tissue[np.broadcast_to(in_plane_core, spec.shape)] = Tissue.SOFT_TISSUE

    liver_centre = (
        -0.38 * body_x + rng.uniform(-5.0, 5.0),
        -0.05 * body_y + rng.uniform(-5.0, 5.0),
        rng.uniform(-10.0, 10.0),
    )
    liver_semi = (0.38 * body_x, 0.52 * body_y, rng.uniform(70.0, 85.0))

    # Lungs start a little below the liver dome; the liver overrides them where they meet.
    lung_base_z = liver_centre[2] + 0.6 * liver_semi[2]
    for side in (-1.0, 1.0):
        lung = _ellipse(
            x, y, centre=(side * 0.48 * body_x, -0.05 * body_y), semi=(0.36 * body_x, 0.60 * body_y)
        )
        tissue[lung & (z > lung_base_z)] = Tissue.LUNG

    organ = _ellipsoid(x, y, z, centre=liver_centre, semi=liver_semi)
    tissue[organ] = Tissue.LIVER

    spine_centre = (0.0, 0.62 * body_y)
    spine_radius = rng.uniform(16.0, 20.0)
    cortex = np.broadcast_to(
        _ellipse(x, y, centre=spine_centre, semi=(spine_radius, spine_radius)), spec.shape
    )
    tissue[cortex] = Tissue.BONE

    lesion_mask = np.zeros(spec.shape, dtype=bool)
    for _ in range(spec.lesion_count):
        lesion_mask |= _lesion(
            spec, rng, x=x, y=y, z=z, organ=organ, liver_centre=liver_centre, liver_semi=liver_semi
        )
    tissue[lesion_mask] = Tissue.LESION

    organ_hu = LIVER_HU + rng.normal(0.0, 3.0)
    tissue_hu = {
        Tissue.AIR: AIR_HU,
        Tissue.FAT: FAT_HU,
        Tissue.SOFT_TISSUE: SOFT_TISSUE_HU,
        Tissue.LUNG: LUNG_HU,
        Tissue.LIVER: organ_hu,
        Tissue.BONE: CORTICAL_BONE_HU,
        Tissue.LESION: organ_hu + spec.lesion_contrast_hu,
    }
    lookup = np.zeros(len(Tissue), dtype=np.float32)
    for label, value in tissue_hu.items():
        lookup[label] = value
    hu = lookup[tissue]
    medulla = np.broadcast_to(
        _ellipse(x, y, centre=spine_centre, semi=(spine_radius - 5.0, spine_radius - 5.0)),
        spec.shape,
    )
    hu[medulla] = CANCELLOUS_BONE_HU

    hu += np.float32(spec.intensity_offset_hu)
    if spec.noise_sigma_hu > 0:
        hu += rng.normal(0.0, spec.noise_sigma_hu, size=spec.shape).astype(np.float32)
    np.clip(hu, MIN_HU, MAX_HU, out=hu)

    return Phantom(
        hu=hu,
        lesion_mask=lesion_mask.astype(np.uint8),
        tissue=tissue,
        organ_mask=organ,
        lesion_count=spec.lesion_count,
    )


def _voxel_centres_mm(spec: PhantomSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Broadcastable voxel-centre coordinates in mm: y (rows,1,1), x (1,cols,1), z (1,1,slices)."""
    y = (np.arange(spec.rows) - (spec.rows - 1) / 2) * spec.pixel_spacing_mm
    x = (np.arange(spec.cols) - (spec.cols - 1) / 2) * spec.pixel_spacing_mm
    z = (np.arange(spec.slices) - (spec.slices - 1) / 2) * spec.slice_spacing_mm
    return y[:, None, None], x[None, :, None], z[None, None, :]


def _ellipse(
    x: np.ndarray, y: np.ndarray, *, centre: tuple[float, float], semi: tuple[float, float]
) -> np.ndarray:
    """In-plane ellipse, bool (rows, cols, 1)."""
    return ((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2 <= 1.0


def _ellipsoid(
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    *,
    centre: tuple[float, float, float],
    semi: tuple[float, float, float],
) -> np.ndarray:
    """Axis-aligned ellipsoid, bool (rows, cols, slices)."""
    return (
        ((x - centre[0]) / semi[0]) ** 2
        + ((y - centre[1]) / semi[1]) ** 2
        + ((z - centre[2]) / semi[2]) ** 2
    ) <= 1.0


def _lesion(
    spec: PhantomSpec,
    rng: np.random.Generator,
    *,
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    organ: np.ndarray,
    liver_centre: tuple[float, float, float],
    liver_semi: tuple[float, float, float],
) -> np.ndarray:
    """One ellipsoidal lesion, bool (rows, cols, slices), clipped to the organ and never empty."""
    # A lesion wider than ~1/4 of the organ would swallow it at coarse matrices.
    max_radius = 0.45 * min(liver_semi[0], liver_semi[1])
    low, high = spec.lesion_radius_mm
    radius = min(rng.uniform(low, high), max_radius)
    semi = tuple(radius * rng.uniform(0.8, 1.2, size=3))

    # Sample the centre inside a shrunken organ so most of the lesion lies within it.
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    depth = rng.uniform(0.0, 1.0) ** (1 / 3) * max(0.0, 1.0 - radius / min(liver_semi))
    centre_mm = [liver_centre[i] + depth * direction[i] * liver_semi[i] for i in range(3)]

    # Centring on an organ voxel guarantees a non-empty mask, even for a lesion thinner than a
    # slice or an organ only a few voxels wide at a coarse matrix.
    organ_voxels = np.argwhere(organ)
    organ_mm = np.stack(
        [
            x.ravel()[organ_voxels[:, 1]],
            y.ravel()[organ_voxels[:, 0]],
            z.ravel()[organ_voxels[:, 2]],
        ],
        axis=1,
    )
    nearest = organ_mm[np.argmin(((organ_mm - centre_mm) ** 2).sum(axis=1))]
    centre = (float(nearest[0]), float(nearest[1]), float(nearest[2]))
    return _ellipsoid(x, y, z, centre=centre, semi=semi) & organ
