"""Dice and HD95 on hand-made masks whose values can be worked out on paper."""

import numpy as np
import pytest
import torch
from monai.metrics import HausdorffDistanceMetric

from site_app.evaluation import PatientEvaluation, VolumeScore, summarize, volume_scores

SHAPE = (16, 16, 16)


def _mask(*boxes):
    """A (16, 16, 16) uint8 mask with 1 inside each box ((r0, r1), (c0, c1), (s0, s1))."""
    mask = np.zeros(SHAPE, dtype=np.uint8)
    for (r0, r1), (c0, c1), (s0, s1) in boxes:
        mask[r0:r1, c0:c1, s0:s1] = 1
    return mask


CUBE = ((4, 6), (4, 6), (4, 6))  # 2 x 2 x 2 voxels
HALF = ((4, 6), (4, 6), (4, 5))  # its first slice: 2 x 2 x 1


def test_identical_masks_have_dice_1_and_hd95_0():
    score = volume_scores(_mask(CUBE), _mask(CUBE), spacing_mm=(1, 1, 1))
    assert score == VolumeScore(dice=1.0, hd95_mm=0.0, has_lesion=True, empty_prediction=False)


@pytest.mark.parametrize(
    ("spacing", "hd95"),
    [
        ((1.0, 1.0, 2.5), 2.5),  # the missing half lies one voxel away along the slice axis
        ((2.5, 1.0, 1.0), 1.0),  # so only the slice spacing matters
        ((0.7, 0.7, 5.0), 5.0),
    ],
)
def test_half_a_cube_dice_two_thirds_and_hd95_one_slice_in_mm(spacing, hd95):
    # Dice = 2 * 4 / (4 + 8). Truth-to-prediction surface distances: 4 x 0 and 4 x one slice;
    # their 95th percentile is one slice spacing; prediction-to-truth distances are all 0.
    score = volume_scores(_mask(HALF), _mask(CUBE), spacing_mm=spacing)
    assert score.dice == pytest.approx(2 / 3)
    assert score.hd95_mm == pytest.approx(hd95)


def test_two_single_voxels_three_rows_apart():
    truth = _mask(((5, 6), (5, 6), (5, 6)))
    prediction = _mask(((8, 9), (5, 6), (5, 6)))
    score = volume_scores(prediction, truth, spacing_mm=(2.0, 1.0, 1.0))
    assert score.dice == 0.0
    assert score.hd95_mm == pytest.approx(6.0)  # 3 rows x 2 mm


def test_hd95_ignores_one_far_outlier_voxel_that_the_maximum_does_not():
    truth = _mask(((2, 8), (2, 8), (2, 8)))  # 6^3 cube: 152 surface voxels
    prediction = _mask(((2, 8), (2, 8), (2, 8)), ((14, 15), (14, 15), (14, 15)))
    score = volume_scores(prediction, truth, spacing_mm=(1, 1, 1))
    assert score.hd95_mm == pytest.approx(0.0)
    maximum = HausdorffDistanceMetric(include_background=True)(
        y_pred=torch.as_tensor(prediction[None, None]).float(),
        y=torch.as_tensor(truth[None, None]).float(),
    )
    assert float(maximum) == pytest.approx(np.sqrt(3 * 7**2))  # corner (7,7,7) to (14,14,14)


def test_empty_prediction_on_a_lesion_scores_dice_0_and_leaves_hd95_undefined():
    score = volume_scores(np.zeros(SHAPE), _mask(CUBE), spacing_mm=(1, 1, 1))
    assert score == VolumeScore(dice=0.0, hd95_mm=None, has_lesion=True, empty_prediction=True)


@pytest.mark.parametrize("prediction", [np.zeros(SHAPE), _mask(CUBE)])
def test_a_volume_without_lesion_is_not_scored(prediction):
    score = volume_scores(prediction, np.zeros(SHAPE), spacing_mm=(1, 1, 1))
    assert score == VolumeScore(dice=None, hd95_mm=None, has_lesion=False, empty_prediction=False)


def test_site_summary_averages_where_defined_and_counts_undefined_hd95():
    spacing = (1.0, 1.0, 2.5)
    patients = [
        PatientEvaluation("p-1", (volume_scores(_mask(CUBE), _mask(CUBE), spacing_mm=spacing),)),
        PatientEvaluation("p-2", (volume_scores(_mask(HALF), _mask(CUBE), spacing_mm=spacing),)),
        PatientEvaluation(
            "p-3", (volume_scores(np.zeros(SHAPE), _mask(CUBE), spacing_mm=spacing),)
        ),
        PatientEvaluation(
            "p-4", (volume_scores(_mask(CUBE), np.zeros(SHAPE), spacing_mm=spacing),)
        ),
    ]
    meta = summarize(patients)
    assert meta.val_dice == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert meta.val_hd95_mm == pytest.approx((0 + 2.5) / 2)  # not 0 or inf for p-3
    assert meta.val_hd95_missing == 1
    assert meta.val_lesion_volumes == 3
    assert meta.val_patients == 4
    assert "p-" not in str(sorted(meta.to_meta().items()))  # patient keys never reach the metadata


def test_no_lesion_anywhere_gives_no_metrics_rather_than_zero():
    healthy = volume_scores(np.zeros(SHAPE), np.zeros(SHAPE), spacing_mm=(1, 1, 1))
    meta = summarize([PatientEvaluation("a", (healthy,))])
    assert meta.val_dice is None and meta.val_hd95_mm is None
    assert meta.val_hd95_missing == 0 and meta.val_lesion_volumes == 0


@pytest.mark.parametrize(
    ("prediction", "truth", "spacing", "message"),
    [
        (np.zeros((4, 4, 4)), np.zeros(SHAPE), (1, 1, 1), "same shape"),
        (np.zeros((4, 4)), np.zeros((4, 4)), (1, 1, 1), "3D masks"),
        (np.zeros(SHAPE), np.zeros(SHAPE), (1, 1), "3 positive numbers"),
        (np.zeros(SHAPE), np.zeros(SHAPE), (1, 0, 1), "3 positive numbers"),
    ],
)
def test_bad_inputs_are_named(prediction, truth, spacing, message):
    with pytest.raises(ValueError, match=message):
        volume_scores(prediction, truth, spacing_mm=spacing)
