"""The synthetic CT phantom: shapes, tissue HU, lesions inside the liver, prevalence."""

from __future__ import annotations

import numpy as np
import pytest

from simulator.phantom import (
    AIR_HU,
    CANCELLOUS_BONE_HU,
    CORTICAL_BONE_HU,
    FAT_HU,
    LUNG_HU,
    SOFT_TISSUE_HU,
    PhantomSpec,
    Tissue,
    draw_lesion_count,
    make_phantom,
)


def _spec(**overrides: object) -> PhantomSpec:
    fields: dict = {
        "rows": 32,
        "cols": 32,
        "slices": 24,
        "pixel_spacing_mm": 11.25,
        "slice_spacing_mm": 5.0,
        "lesion_count": 1,
        "lesion_radius_mm": (17.0, 34.0),
        "lesion_contrast_hu": -40.0,
    }
    fields.update(overrides)
    return PhantomSpec(**fields)


@pytest.mark.parametrize(
    ("rows", "cols", "slices", "pixel_spacing_mm", "slice_spacing_mm"),
    [(32, 32, 16, 11.25, 5.0), (64, 64, 24, 5.6, 1.25), (48, 40, 20, 7.0, 3.0)],
)
def test_arrays_have_the_documented_shape_and_dtype(
    rows: int, cols: int, slices: int, pixel_spacing_mm: float, slice_spacing_mm: float
) -> None:
    spec = _spec(
        rows=rows,
        cols=cols,
        slices=slices,
        pixel_spacing_mm=pixel_spacing_mm,
        slice_spacing_mm=slice_spacing_mm,
        lesion_radius_mm=(1.5 * pixel_spacing_mm, 3 * pixel_spacing_mm),
        noise_sigma_hu=10.0,
    )
    phantom = make_phantom(spec, rng=np.random.default_rng(0))
    assert phantom.hu.shape == phantom.lesion_mask.shape == phantom.tissue.shape == spec.shape
    assert phantom.hu.dtype == np.float32
    assert phantom.lesion_mask.dtype == np.uint8
    assert set(np.unique(phantom.lesion_mask)) <= {0, 1}


def test_noise_free_tissues_have_their_hounsfield_units() -> None:
    phantom = make_phantom(_spec(slices=40, lesion_contrast_hu=-45.0), rng=np.random.default_rng(1))
    hu, tissue = phantom.hu, phantom.tissue

    assert np.all(hu[tissue == Tissue.AIR] == AIR_HU)
    assert np.all(hu[tissue == Tissue.FAT] == FAT_HU)
    assert np.all(hu[tissue == Tissue.SOFT_TISSUE] == SOFT_TISSUE_HU)
    assert np.all(hu[tissue == Tissue.LUNG] == LUNG_HU)
    liver = hu[tissue == Tissue.LIVER]
    assert np.ptp(liver) == 0 and 45.0 <= liver[0] <= 75.0
    assert np.all(hu[tissue == Tissue.LESION] == pytest.approx(liver[0] - 45.0))
    bone = hu[tissue == Tissue.BONE]
    assert set(np.unique(bone)) == {CANCELLOUS_BONE_HU, CORTICAL_BONE_HU}


def test_corners_are_air_and_lungs_only_in_upper_slices() -> None:
    phantom = make_phantom(_spec(slices=40), rng=np.random.default_rng(2))
    assert np.all(phantom.tissue[0, 0, :] == Tissue.AIR)
    lung_slices = np.flatnonzero((phantom.tissue == Tissue.LUNG).any(axis=(0, 1)))
    assert lung_slices.size > 0
    assert lung_slices.min() > phantom.tissue.shape[2] // 2
    assert lung_slices.max() == phantom.tissue.shape[2] - 1


@pytest.mark.parametrize("seed", range(12))
def test_lesions_lie_inside_the_organ(seed: int) -> None:
    phantom = make_phantom(_spec(lesion_count=3), rng=np.random.default_rng(seed))
    lesion = phantom.lesion_mask.astype(bool)
    assert lesion.any()
    assert np.all(phantom.organ_mask[lesion])


@pytest.mark.parametrize("lesion_count", [0, 1, 2])
def test_mask_is_non_empty_exactly_when_a_lesion_is_placed(lesion_count: int) -> None:
    for seed in range(5):
        phantom = make_phantom(_spec(lesion_count=lesion_count), rng=np.random.default_rng(seed))
        assert phantom.lesion_mask.any() == (lesion_count > 0)


def test_smallest_lesion_is_still_a_few_voxels_wide_at_matrix_32() -> None:
    pixel = 11.25
    for seed in range(10):
        spec = _spec(lesion_radius_mm=(1.5 * pixel, 1.5 * pixel))
        phantom = make_phantom(spec, rng=np.random.default_rng(seed))
        rows, cols, _ = np.nonzero(phantom.lesion_mask)
        assert rows.max() - rows.min() + 1 >= 2
        assert cols.max() - cols.min() + 1 >= 2


def test_lesion_contrast_stands_well_above_the_noise() -> None:
    spec = _spec(noise_sigma_hu=15.0, lesion_contrast_hu=-35.0, lesion_radius_mm=(30.0, 34.0))
    phantom = make_phantom(spec, rng=np.random.default_rng(3))
    lesion = phantom.hu[phantom.tissue == Tissue.LESION]
    liver = phantom.hu[phantom.tissue == Tissue.LIVER]
    assert liver.mean() - lesion.mean() == pytest.approx(35.0, abs=5.0)
    assert np.std(liver) == pytest.approx(15.0, rel=0.15)


def test_intensity_offset_shifts_every_tissue() -> None:
    plain = make_phantom(_spec(), rng=np.random.default_rng(4))
    shifted = make_phantom(_spec(intensity_offset_hu=12.0), rng=np.random.default_rng(4))
    body = plain.tissue != Tissue.AIR
    assert np.allclose(shifted.hu[body] - plain.hu[body], 12.0)


def test_same_generator_state_gives_identical_phantoms() -> None:
    spec = _spec(noise_sigma_hu=10.0, lesion_count=2)
    first = make_phantom(spec, rng=np.random.default_rng(7))
    second = make_phantom(spec, rng=np.random.default_rng(7))
    other = make_phantom(spec, rng=np.random.default_rng(8))
    assert np.array_equal(first.hu, second.hu)
    assert np.array_equal(first.lesion_mask, second.lesion_mask)
    assert not np.array_equal(first.hu, other.hu)


@pytest.mark.parametrize("prevalence", [0.0, 0.6, 0.9, 1.0])
def test_lesion_prevalence_is_respected_over_many_patients(prevalence: float) -> None:
    rng = np.random.default_rng(5)
    counts = np.array(
        [draw_lesion_count(prevalence=prevalence, max_lesions=3, rng=rng) for _ in range(4000)]
    )
    assert np.mean(counts > 0) == pytest.approx(prevalence, abs=0.03)
    assert counts.max() <= 3


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"rows": 4}, "rows"),
        ({"slice_spacing_mm": 0.0}, "slice_spacing_mm"),
        ({"noise_sigma_hu": -1.0}, "noise_sigma_hu"),
        ({"lesion_count": -1}, "lesion_count"),
        ({"lesion_radius_mm": (20.0, 10.0)}, "lesion_radius_mm"),
    ],
)
def test_invalid_spec_names_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        _spec(**overrides)


@pytest.mark.parametrize(
    ("prevalence", "max_lesions", "field"), [(1.5, 2, "prevalence"), (0.5, 0, "max_lesions")]
)
def test_invalid_lesion_draw_names_the_argument(
    prevalence: float, max_lesions: int, field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        draw_lesion_count(
            prevalence=prevalence, max_lesions=max_lesions, rng=np.random.default_rng(0)
        )
