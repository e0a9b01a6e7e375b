"""Per-site scanner and population profiles for the synthetic federation.

A `SiteProfile` is derived deterministically from (seed, site index, matrix): vendor, geometry,
noise, calibration, lesion prevalence/size/contrast, patient mix and DICOM encoding differ by site.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

logger = logging.getLogger(__name__)

# Stream ids keep the per-site generators independent of each other and of the patient streams.
_SITE_STREAM = 1
_FEDERATION_STREAM = 0

# Thickness in mm; sites take distinct entries while there are enough of them.
_SLICE_THICKNESSES_MM = (1.25, 2.0, 2.5, 3.0, 5.0)
# In-plane spacing a 512 matrix would have, in mm (FOV 320-400 mm); scaled by 512 / matrix.
_FULL_RES_PIXEL_SPACING_MM = (0.625, 0.703, 0.742, 0.781)


class RescaleConvention(StrEnum):
    """How a vendor stores HU in pixel data."""

    UNSIGNED_OFFSET = "unsigned_intercept_-1024"
    """PixelRepresentation 0, BitsStored 12, RescaleIntercept -1024."""
    SIGNED = "signed_intercept_0"
    """PixelRepresentation 1, BitsStored 16, RescaleIntercept 0."""


@dataclass(frozen=True, kw_only=True)
class Scanner:
    """A vendor's CT model as it names itself in DICOM, and the same vendor's MR model."""

    manufacturer: str
    model_name: str
    kvp: float
    rescale: RescaleConvention
    mr_model_name: str


_SCANNERS = (
    Scanner(
        manufacturer="GE MEDICAL SYSTEMS",
        model_name="Revolution CT",
        kvp=120.0,
        rescale=RescaleConvention.SIGNED,
        mr_model_name="SIGNA Artist",
    ),
    Scanner(
        manufacturer="SIEMENS",
        model_name="SOMATOM Definition AS",
        kvp=120.0,
        rescale=RescaleConvention.UNSIGNED_OFFSET,
        mr_model_name="MAGNETOM Aera",
    ),
    Scanner(
        manufacturer="Philips",
        model_name="Brilliance 64",
        kvp=120.0,
        rescale=RescaleConvention.UNSIGNED_OFFSET,
        mr_model_name="Ingenia",
    ),
    Scanner(
        manufacturer="CANON_MEC",
        model_name="Aquilion ONE",
        kvp=100.0,
        rescale=RescaleConvention.SIGNED,
        mr_model_name="Vantage Orian",
    ),
)


@dataclass(frozen=True, kw_only=True)
class SiteProfile:
    """Everything that makes one hospital's data look like that hospital's.

    Attributes:
        name: FLARE client name, `site-K` (K from 1).
        index: 0-based site index.
        scanner: vendor, model, kVp and pixel storage convention.
        transfer_syntax_uid: transfer syntax of the site's CT files.
        matrix: in-plane rows = columns.
        pixel_spacing_mm: in-plane pixel size in mm.
        slice_thickness_mm: slice thickness = spacing between slices, in mm.
        slices: slices per CT series.
        noise_sigma_hu: image noise, HU standard deviation.
        intensity_offset_hu: calibration offset of this scanner, HU.
        lesion_prevalence: probability that a patient has at least one lesion.
        max_lesions: most lesions one patient can have.
        lesion_radius_mm: (min, max) lesion radius in mm.
        lesion_contrast_hu: (min, max) magnitude of lesion-minus-liver contrast, HU.
        hypodense_fraction: share of lesions darker than the liver; the rest are brighter.
        female_fraction: share of female patients.
        age_range_years: (min, max) patient age in whole years.
        institution_name: fake institution written into the files.
    """

    name: str
    index: int
    scanner: Scanner
    transfer_syntax_uid: str
    matrix: int
    pixel_spacing_mm: float
    slice_thickness_mm: float
    slices: int
    noise_sigma_hu: float
    intensity_offset_hu: float
    lesion_prevalence: float
    max_lesions: int
    lesion_radius_mm: tuple[float, float]
    lesion_contrast_hu: tuple[float, float]
    hypodense_fraction: float
    female_fraction: float
    age_range_years: tuple[int, int]
    institution_name: str

    @property
    def field_of_view_mm(self) -> tuple[float, float]:
        """(in-plane, cranio-caudal) extent in mm."""
        return (self.matrix * self.pixel_spacing_mm, self.slices * self.slice_thickness_mm)


def slice_count(*, matrix: int, pixel_spacing_mm: float, slice_thickness_mm: float) -> int:
    """Slices so the cranio-caudal extent roughly matches the in-plane field of view.

    Clamped to [max(16, 3/8 matrix), 3/2 matrix] so thin-slice sites stay cheap to train on.
    """
    low = max(16, round(matrix * 3 / 8))
    high = max(low, round(matrix * 3 / 2))
    wanted = round(matrix * pixel_spacing_mm / slice_thickness_mm)
    return int(min(max(wanted, low), high))


def site_profile(*, seed: int, site_index: int, matrix: int) -> SiteProfile:
    """The profile of site `site_index` (0-based) for a federation seeded with `seed`.

    A site's profile does not depend on how many sites the federation has.
    """
    if seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed}")
    if site_index < 0:
        raise ValueError(f"site_index: expected an int >= 0, got {site_index}")
    if matrix < 16:
        raise ValueError(f"matrix: expected an int >= 16, got {matrix} (the demo uses 64)")

    # Seed-level offsets rotate vendors, thicknesses and pixel sizes so that the first 4 sites
    # never share any of them, whatever the seed.
    federation_rng = np.random.default_rng([seed, _FEDERATION_STREAM])
    vendor_offset = int(federation_rng.integers(len(_SCANNERS)))
    thickness_offset = int(federation_rng.integers(len(_SLICE_THICKNESSES_MM)))
    spacing_offset = int(federation_rng.integers(len(_FULL_RES_PIXEL_SPACING_MM)))
    rng = np.random.default_rng([seed, _SITE_STREAM, site_index])

    scanner = _SCANNERS[(vendor_offset + site_index) % len(_SCANNERS)]
    thickness = _SLICE_THICKNESSES_MM[(thickness_offset + site_index) % len(_SLICE_THICKNESSES_MM)]
    full_res_spacing = _FULL_RES_PIXEL_SPACING_MM[
        (spacing_offset + site_index) % len(_FULL_RES_PIXEL_SPACING_MM)
    ]
    pixel_spacing = round(full_res_spacing * 512 / matrix, 4)
    # Lesion size is tied to the pixel size so lesions stay a few voxels wide at any matrix
    # (at matrix 64, radius 13-30 mm: the range of liver metastases that CT reports measure).
    radius_px = (float(rng.uniform(2.0, 2.5)), float(rng.uniform(4.0, 5.0)))
    low_age = int(rng.integers(25, 45))
    # One site in four exports Implicit VR, as older PACS gateways still do.
    transfer_syntax = ImplicitVRLittleEndian if site_index % 4 == 1 else ExplicitVRLittleEndian

    return SiteProfile(
        name=f"site-{site_index + 1}",
        index=site_index,
        scanner=scanner,
        transfer_syntax_uid=str(transfer_syntax),
        matrix=matrix,
        pixel_spacing_mm=pixel_spacing,
        slice_thickness_mm=thickness,
        slices=slice_count(
            matrix=matrix, pixel_spacing_mm=pixel_spacing, slice_thickness_mm=thickness
        ),
        noise_sigma_hu=round(float(rng.uniform(6.0, 15.0)), 2),
        intensity_offset_hu=round(float(rng.uniform(-12.0, 12.0)), 2),
        lesion_prevalence=round(float(rng.uniform(0.6, 0.95)), 3),
        max_lesions=int(rng.integers(1, 4)),
        lesion_radius_mm=(
            round(radius_px[0] * pixel_spacing, 2),
            round(radius_px[1] * pixel_spacing, 2),
        ),
        # Hypodense metastases in portal-venous CT differ from liver by roughly 40-80 HU.
        lesion_contrast_hu=(
            round(float(rng.uniform(40.0, 50.0)), 1),
            round(float(rng.uniform(65.0, 80.0)), 1),
        ),
        hypodense_fraction=round(float(rng.uniform(0.6, 1.0)), 3),
        female_fraction=round(float(rng.uniform(0.3, 0.7)), 3),
        age_range_years=(low_age, low_age + int(rng.integers(30, 50))),
        institution_name=f"Synthetic Hospital {site_index + 1}",
    )


def site_profiles(*, seed: int, sites: int, matrix: int) -> tuple[SiteProfile, ...]:
    """Profiles of `site-1` … `site-{sites}`."""
    if sites < 1:
        raise ValueError(f"sites: expected an int >= 1, got {sites}")
    return tuple(site_profile(seed=seed, site_index=i, matrix=matrix) for i in range(sites))
