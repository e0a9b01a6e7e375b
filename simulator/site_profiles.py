"""Per-site scanner and population profiles for the synthetic federation and the public cohort.

A `SiteProfile` is derived deterministically from (seed, site index, matrix): vendor, geometry,
noise, calibration, lesion prevalence/size/contrast, patient mix and DICOM encoding differ by site.
The public cohort's centres (`public_profile`) are drawn from deliberately different ranges.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

logger = logging.getLogger(__name__)

# Stream ids keep the per-site generators independent of each other and of the patient streams
# (synthetic_data uses 2, 3, 5 and 6).
_SITE_STREAM = 1
_FEDERATION_STREAM = 0
_PUBLIC_STREAM = 4

# Thickness in mm; sites take distinct entries while there are enough of them. One per
# subgroup band of site_app.subgroups (<=1.5, 1.5-3, 3-5 mm) at least, and few thin ones: a
# 1.5 mm series needs 3.3x the files of a 5 mm one to cover the same body, while training
# resamples every series to 5 mm anyway.
_SLICE_THICKNESSES_MM = (1.5, 2.5, 3.0, 4.0, 5.0)
# Cranio-caudal extent a series aims to cover, mm: the phantom's whole liver (at most 95 mm
# either side of the volume centre) with a margin, and more than a 32-voxel training crop at 5 mm.
CRANIOCAUDAL_COVERAGE_MM = 200.0
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


# Vendors of the public cohort only, none of them in _SCANNERS: a model pretrained on public
# data has never seen a site's scanner, as in practice.
_PUBLIC_SCANNERS = (
    Scanner(
        manufacturer="UIH",
        model_name="uCT 780",
        kvp=120.0,
        rescale=RescaleConvention.SIGNED,
        mr_model_name="uMR 780",
    ),
    Scanner(
        manufacturer="FUJIFILM Healthcare",
        model_name="SCENARIA View",
        kvp=120.0,
        rescale=RescaleConvention.UNSIGNED_OFFSET,
        mr_model_name="ECHELON Smart",
    ),
)
# HU calibration offsets: a site's is drawn from _SITE_OFFSET_HU; a public centre's magnitude
# from _PUBLIC_OFFSET_MAGNITUDE_HU, with either sign, so no public centre is calibrated like any
# site.
_SITE_OFFSET_HU = (-12.0, 12.0)
_PUBLIC_OFFSET_MAGNITUDE_HU = (15.0, 25.0)


@dataclass(frozen=True, kw_only=True)
class SiteProfile:
    """Everything that makes one hospital's data look like that hospital's.

    Attributes:
        name: FLARE client name, `site-K` (K from 1); `public-K` for a public cohort centre.
        index: 0-based site (or public centre) index.
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

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SiteProfile:
        """The profile `dataclasses.asdict` turned into `record` (e.g. read back from JSON)."""
        fields = dict(record)
        scanner = dict(fields["scanner"])
        fields["scanner"] = Scanner(**{**scanner, "rescale": RescaleConvention(scanner["rescale"])})
        for name in ("lesion_radius_mm", "lesion_contrast_hu", "age_range_years"):
            fields[name] = tuple(fields[name])
        return cls(**fields)


def slice_count(*, matrix: int, slice_thickness_mm: float) -> int:
    """Slices so a series covers `CRANIOCAUDAL_COVERAGE_MM` at this thickness.

    Clamped to [max(16, 3/8 matrix), 3/2 matrix]: a 1.5 mm site stops at 96 slices (144 mm) at
    matrix 64, so thin-slice sites stay cheap to write and to train on.
    """
    low = max(16, round(matrix * 3 / 8))
    high = max(low, round(matrix * 3 / 2))
    wanted = round(CRANIOCAUDAL_COVERAGE_MM / slice_thickness_mm)
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
        slices=slice_count(matrix=matrix, slice_thickness_mm=thickness),
        noise_sigma_hu=round(float(rng.uniform(6.0, 15.0)), 2),
        intensity_offset_hu=round(float(rng.uniform(*_SITE_OFFSET_HU)), 2),
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


def public_profile(*, seed: int, index: int, matrix: int) -> SiteProfile:
    """Centre `index` (0-based) of the public cohort: what a public challenge dataset looks like.

    Unlike any site of any seed: another vendor (`_PUBLIC_SCANNERS`), an HU calibration offset
    of 15-25 HU either way (sites: within 12 HU), larger lesions (radius 3-3.5 px at the small
    end, sites 2-2.5 px; the phantom caps every lesion near 25 mm) some 15-30 HU further from
    the liver, and more patients with lesions (0.85-1.0), as challenge data selected for its
    lesions has. Geometry and noise come from the sites' ranges. Drawn from its own stream of
    `seed`.
    """
    if seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed}")
    if not 0 <= index < len(_PUBLIC_SCANNERS):
        raise ValueError(
            f"index: expected an int in [0, {len(_PUBLIC_SCANNERS) - 1}] (one per public "
            f"vendor), got {index}"
        )
    if matrix < 16:
        raise ValueError(f"matrix: expected an int >= 16, got {matrix} (the demo uses 64)")

    rng = np.random.default_rng([seed, _PUBLIC_STREAM, index])
    thickness = _SLICE_THICKNESSES_MM[int(rng.integers(len(_SLICE_THICKNESSES_MM)))]
    full_res_spacing = _FULL_RES_PIXEL_SPACING_MM[
        int(rng.integers(len(_FULL_RES_PIXEL_SPACING_MM)))
    ]
    pixel_spacing = round(full_res_spacing * 512 / matrix, 4)
    radius_px = (float(rng.uniform(3.0, 3.5)), float(rng.uniform(4.5, 5.5)))
    offset = float(rng.uniform(*_PUBLIC_OFFSET_MAGNITUDE_HU)) * (
        1.0 if rng.random() < 0.5 else -1.0
    )
    low_age = int(rng.integers(25, 45))
    return SiteProfile(
        name=f"public-{index + 1}",
        index=index,
        scanner=_PUBLIC_SCANNERS[index],
        transfer_syntax_uid=str(ExplicitVRLittleEndian),
        matrix=matrix,
        pixel_spacing_mm=pixel_spacing,
        slice_thickness_mm=thickness,
        slices=slice_count(matrix=matrix, slice_thickness_mm=thickness),
        noise_sigma_hu=round(float(rng.uniform(6.0, 15.0)), 2),
        intensity_offset_hu=round(offset, 2),
        lesion_prevalence=round(float(rng.uniform(0.85, 1.0)), 3),
        max_lesions=int(rng.integers(2, 5)),
        lesion_radius_mm=(
            round(radius_px[0] * pixel_spacing, 2),
            round(radius_px[1] * pixel_spacing, 2),
        ),
        lesion_contrast_hu=(
            round(float(rng.uniform(60.0, 70.0)), 1),
            round(float(rng.uniform(90.0, 110.0)), 1),
        ),
        hypodense_fraction=round(float(rng.uniform(0.6, 1.0)), 3),
        female_fraction=round(float(rng.uniform(0.3, 0.7)), 3),
        age_range_years=(low_age, low_age + int(rng.integers(30, 50))),
        institution_name=f"Public Challenge Centre {index + 1}",
    )


def public_profiles(*, seed: int, matrix: int) -> tuple[SiteProfile, ...]:
    """The centres of the public cohort, one per public vendor: `public-1`, `public-2`."""
    return tuple(
        public_profile(seed=seed, index=i, matrix=matrix) for i in range(len(_PUBLIC_SCANNERS))
    )
