"""Has a site's data moved since a job trained on it? One fingerprint against another, feature by
feature, each with its own measure and a stated threshold (pure; ``fedseg site drift`` reads the
files and prints the verdict).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # for annotations only: `fedseg site drift --help` need not load ingestion
    from site_app.fingerprint import DataFingerprint, HuProfile

__all__ = [
    "DriftReport",
    "DriftThresholds",
    "Feature",
    "FeatureDrift",
    "compare_fingerprints",
    "hu_quantile_shifts",
    "population_stability_index",
    "total_variation",
]

_SHIFT_LEVELS = ("5", "10", "25", "50", "75", "90", "95")
"""HU percentiles whose shift is judged: the 1st and 99th follow a few bone or metal voxels."""
_PSI_FLOOR = 1e-4
"""Empty bins count as this share in the PSI (its usual smoothing): ln(0) is undefined."""


class Feature(StrEnum):
    """What is compared; the value is also the threshold's name (``--threshold NAME=VALUE``)."""

    HU_SHIFT = "hu_shift"
    HU_PSI = "hu_psi"
    VENDOR_MIX = "vendor_mix"
    SLICE_THICKNESS_MIX = "slice_thickness_mix"
    IN_PLANE_SPACING = "in_plane_spacing"
    SLICE_SPACING = "slice_spacing"
    LESION_PREVALENCE = "lesion_prevalence"
    LESION_VOXEL_FRACTION = "lesion_voxel_fraction"


@dataclass(frozen=True, kw_only=True)
class DriftThresholds:
    """Above a threshold a feature is flagged as drifted (the comparison is ``>``)."""

    hu_shift: float = 20.0
    """HU: the largest shift of the body-voxel 5th-95th percentiles. Above a scanner's
    calibration tolerance (water within about +-7 HU in acceptance tests) and below the change a
    new contrast phase or reconstruction kernel brings (tens of HU in soft tissue)."""
    hu_psi: float = 0.25
    """Population stability index of the body-voxel HU histogram (25 HU bins); 0.25 is the
    usual "significant shift" line (0.1-0.25 moderate). Catches a change of shape (noise,
    kernel) that leaves the percentiles in place."""
    vendor_mix: float = 0.2
    """Total-variation distance of the vendor mix over patients (0 same, 1 disjoint): a fifth
    of the patients moved to another vendor."""
    slice_thickness_mix: float = 0.2
    """Total-variation distance of the slice-thickness mix over patients."""
    in_plane_spacing: float = 0.2
    """Relative change of the median in-plane spacing: beyond the spread of fields of view of
    one protocol (0.625-0.78 mm at 512 pixels is 25% apart)."""
    slice_spacing: float = 0.2
    """Relative change of the median slice spacing (5 mm -> 2.5 mm is 0.5)."""
    lesion_prevalence: float = 0.2
    """Absolute change of the share of volumes with a lesion (0.2 = 20 percentage points)."""
    lesion_voxel_fraction: float = 0.5
    """Relative change of the mean lesion voxel fraction (lesions half again as large or
    small)."""

    def __post_init__(self) -> None:
        problems = [
            f"{f.name}: expected a number > 0, got {getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if not (isinstance(getattr(self, f.name), int | float) and getattr(self, f.name) > 0)
        ]
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True, kw_only=True)
class FeatureDrift:
    """One feature's verdict. ``value`` is signed where a direction exists (current minus
    reference: HU shift, spacing, prevalence and lesion-fraction changes) and is None when the
    feature cannot be compared (``note`` says why); then it is not flagged."""

    feature: Feature
    measure: str
    """What ``value`` is, with its unit, e.g. "largest percentile shift (HU)"."""
    reference: str
    current: str
    value: float | None
    threshold: float
    note: str = ""

    @property
    def flagged(self) -> bool:
        return self.value is not None and abs(self.value) > self.threshold


@dataclass(frozen=True)
class DriftReport:
    reference: DataFingerprint
    current: DataFingerprint
    features: tuple[FeatureDrift, ...]

    @property
    def drifted(self) -> tuple[FeatureDrift, ...]:
        return tuple(f for f in self.features if f.flagged)


# -- measures ------------------------------------------------------------------------------------


def total_variation(reference: dict[str, float], current: dict[str, float]) -> float:
    """Half the L1 distance of two categorical mixes (shares): 0 same, 1 disjoint."""
    names = set(reference) | set(current)
    return 0.5 * sum(abs(reference.get(n, 0.0) - current.get(n, 0.0)) for n in names)


def population_stability_index(reference: np.ndarray, current: np.ndarray) -> float:
    """PSI = sum (c - r) ln(c / r) over bins of two histograms of shares (shape (bins,)),
    each share floored at `_PSI_FLOOR`."""
    r = np.maximum(np.asarray(reference, dtype=np.float64), _PSI_FLOOR)
    c = np.maximum(np.asarray(current, dtype=np.float64), _PSI_FLOOR)
    return float(np.sum((c - r) * np.log(c / r)))


def hu_quantile_shifts(reference: HuProfile, current: HuProfile) -> dict[str, float]:
    """Current minus reference HU at each judged percentile (``"5"`` ... ``"95"``)."""
    return {
        level: current.quantiles_hu[level] - reference.quantiles_hu[level]
        for level in _SHIFT_LEVELS
    }


def _relative_change(reference: float, current: float) -> float | None:
    return None if reference == 0 else (current - reference) / reference


def _mix_text(mix: dict[str, float], limit: int = 3) -> str:
    ordered = sorted(mix.items(), key=lambda item: (-item[1], item[0]))
    text = ", ".join(f"{name} {share:.0%}" for name, share in ordered[:limit])
    return text + (f" +{len(ordered) - limit} more" if len(ordered) > limit else "")


# -- the comparison ------------------------------------------------------------------------------


def _hu_features(
    reference: HuProfile | None, current: HuProfile | None, thresholds: DriftThresholds
) -> list[FeatureDrift]:
    if reference is None or current is None:
        missing = "the reference" if reference is None else "the current data"
        return [
            FeatureDrift(
                feature=feature,
                measure=measure,
                reference="n/a" if reference is None else "",
                current="n/a" if current is None else "",
                value=None,
                threshold=getattr(thresholds, feature.value),
                note=f"{missing} has no body voxel (> -500 HU)",
            )
            for feature, measure in (
                (Feature.HU_SHIFT, "largest percentile shift (HU)"),
                (Feature.HU_PSI, "PSI, 25 HU bins"),
            )
        ]
    shifts = hu_quantile_shifts(reference, current)
    level, largest = max(shifts.items(), key=lambda item: (abs(item[1]), -int(item[0])))
    median = "median {:.0f} HU, p5-p95 {:.0f} to {:.0f}"
    psi = population_stability_index(reference.histogram_shares, current.histogram_shares)
    return [
        FeatureDrift(
            feature=Feature.HU_SHIFT,
            measure="largest percentile shift (HU)",
            reference=median.format(*(reference.quantiles_hu[q] for q in ("50", "5", "95"))),
            current=median.format(*(current.quantiles_hu[q] for q in ("50", "5", "95"))),
            value=largest,
            threshold=thresholds.hu_shift,
            note=f"at p{level}; median {shifts['50']:+.0f} HU" if largest else "",
        ),
        FeatureDrift(
            feature=Feature.HU_PSI,
            measure="PSI, 25 HU bins",
            reference=f"{reference.body_voxels:,} body voxels",
            current=f"{current.body_voxels:,} body voxels",
            value=psi,
            threshold=thresholds.hu_psi,
        ),
    ]


def _mix_feature(
    feature: Feature, reference: dict[str, float], current: dict[str, float], threshold: float
) -> FeatureDrift:
    new = sorted(set(current) - set(reference))
    gone = sorted(set(reference) - set(current))
    notes = ([f"new: {', '.join(new)}"] if new else []) + (
        [f"absent: {', '.join(gone)}"] if gone else []
    )
    return FeatureDrift(
        feature=feature,
        measure="total-variation distance",
        reference=_mix_text(reference),
        current=_mix_text(current),
        value=total_variation(reference, current),
        threshold=threshold,
        note="; ".join(notes),
    )


def _spacing_feature(
    feature: Feature, reference: dict[str, float], current: dict[str, float], threshold: float
) -> FeatureDrift:
    def text(quantiles: dict[str, float]) -> str:
        low, median, high = quantiles["0"], quantiles["50"], quantiles["100"]
        return f"median {median:.3g} mm" + ("" if low == high else f" ({low:.3g}-{high:.3g})")

    return FeatureDrift(
        feature=feature,
        measure="relative change of the median",
        reference=text(reference),
        current=text(current),
        value=_relative_change(reference["50"], current["50"]),
        threshold=threshold,
    )


def compare_fingerprints(
    reference: DataFingerprint,
    current: DataFingerprint,
    thresholds: DriftThresholds | None = None,
) -> DriftReport:
    """Each feature of ``current`` against ``reference`` (the job's), judged by ``thresholds``
    (default `DriftThresholds()`)."""
    thresholds = thresholds or DriftThresholds()
    features = _hu_features(reference.hu, current.hu, thresholds)
    features += [
        _mix_feature(
            Feature.VENDOR_MIX, reference.vendor_mix, current.vendor_mix, thresholds.vendor_mix
        ),
        _mix_feature(
            Feature.SLICE_THICKNESS_MIX,
            reference.slice_thickness_mix,
            current.slice_thickness_mix,
            thresholds.slice_thickness_mix,
        ),
    ]
    for feature, attribute in (
        (Feature.IN_PLANE_SPACING, "in_plane_spacing_mm"),
        (Feature.SLICE_SPACING, "slice_spacing_mm"),
    ):
        features.append(
            _spacing_feature(
                feature,
                getattr(reference, attribute),
                getattr(current, attribute),
                getattr(thresholds, feature.value),
            )
        )
    prevalence = (reference.labels.prevalence, current.labels.prevalence)
    features.append(
        FeatureDrift(
            feature=Feature.LESION_PREVALENCE,
            measure="change of the share (absolute)",
            reference=f"{prevalence[0]:.0%} of volumes",
            current=f"{prevalence[1]:.0%} of volumes",
            value=prevalence[1] - prevalence[0],
            threshold=thresholds.lesion_prevalence,
        )
    )
    fraction = (reference.labels.lesion_voxel_fraction, current.labels.lesion_voxel_fraction)
    change = _relative_change(*fraction)
    features.append(
        FeatureDrift(
            feature=Feature.LESION_VOXEL_FRACTION,
            measure="relative change of the mean",
            reference=f"{fraction[0]:.3%} of voxels",
            current=f"{fraction[1]:.3%} of voxels",
            value=change,
            threshold=thresholds.lesion_voxel_fraction,
            note="" if change is not None else "the reference has no lesion voxel",
        )
    )
    return DriftReport(reference=reference, current=current, features=tuple(features))
