"""Metrics per patient subgroup (sex, age band, scanner vendor, slice-thickness band), at the site.

Groups come from the DICOM headers ingestion keeps (``PatientRecord``); cells with fewer than the
minimum number of patients are dropped here, before anything leaves the site, so a suppressed
cell's numbers never reach a FLARE message. Only the server pools cells across sites.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from jobs import keys
from jobs.messages import SubgroupCell
from site_app.evaluation import PatientEvaluation, patient_dice, patient_hd95

__all__ = [
    "MIN_SUBGROUP_SIZE",
    "PatientGroups",
    "age_band",
    "patient_groups",
    "sex_group",
    "subgroup_cells",
    "thickness_band",
    "vendor_group",
]

MIN_SUBGROUP_SIZE = 5
"""The floor on a cell's patients: a job may raise it (``evaluation.min_subgroup_size``), never
lower it."""

_AGE_BANDS = ((40, "<40"), (60, "40-59"), (80, "60-79"))  # (upper bound, exclusive; label)
_THICKNESS_BANDS = ((1.5, "<=1.5 mm"), (3.0, "1.5-3 mm"), (5.0, "3-5 mm"))  # (upper, inclusive)
_SEX = {"F": "female", "M": "male", "O": "other"}
_VENDORS = (  # Manufacturer prefixes -> one name per vendor, however the scanner spells it
    ("GE", "GE"),
    ("SIEMENS", "Siemens"),
    ("PHILIPS", "Philips"),
    ("CANON", "Canon"),
    ("TOSHIBA", "Canon"),
)


def age_band(age_years: int | None) -> str:
    """``<40``, ``40-59``, ``60-79``, ``80+`` or ``unknown``."""
    if age_years is None:
        return keys.UNKNOWN
    for upper, label in _AGE_BANDS:
        if age_years < upper:
            return label
    return "80+"


def thickness_band(slice_thickness_mm: float | None) -> str:
    """``<=1.5 mm``, ``1.5-3 mm`` (1.5 < t <= 3), ``3-5 mm`` (3 < t <= 5), ``>5 mm`` or
    ``unknown``."""
    if slice_thickness_mm is None or not slice_thickness_mm > 0:
        return keys.UNKNOWN
    for upper, label in _THICKNESS_BANDS:
        if slice_thickness_mm <= upper:
            return label
    return ">5 mm"


def sex_group(sex: str | None) -> str:
    return _SEX.get(sex or "", keys.UNKNOWN)


def vendor_group(manufacturer: str | None) -> str:
    """One name per known vendor (``GE MEDICAL SYSTEMS`` -> ``GE``); other names as written,
    upper-cased and cut to 32 characters."""
    name = " ".join((manufacturer or "").upper().split())
    if not name:
        return keys.UNKNOWN
    for prefix, vendor in _VENDORS:
        if name == prefix or name.startswith(prefix + " ") or name.startswith(prefix + "_"):
            return vendor
    return name[:32]


@dataclass(frozen=True)
class PatientGroups:
    """The subgroup each attribute puts a patient in (labels from ``jobs.keys.SUBGROUP_VALUES``)."""

    sex: str
    age_band: str
    vendor: str
    slice_thickness_band: str

    def items(self) -> tuple[tuple[str, str], ...]:
        return (
            (keys.SEX, self.sex),
            (keys.AGE_BAND, self.age_band),
            (keys.VENDOR, self.vendor),
            (keys.SLICE_THICKNESS_BAND, self.slice_thickness_band),
        )


def patient_groups(record) -> PatientGroups:
    """Groups of one ``site_app.volumes.PatientRecord`` (headers of its first volume)."""
    return PatientGroups(
        sex=sex_group(record.sex),
        age_band=age_band(record.age_years),
        vendor=vendor_group(record.manufacturer),
        slice_thickness_band=thickness_band(record.slice_thickness_mm),
    )


def subgroup_cells(
    evaluations: Sequence[PatientEvaluation],
    groups: Mapping[str, PatientGroups],
    *,
    min_cell_size: int = MIN_SUBGROUP_SIZE,
) -> list[SubgroupCell]:
    """Per (attribute, value): patients, mean Dice and mean HD95 (mm), small cells dropped.

    A cell's patients are the held-out patients in it with a lesion (those a Dice exists for);
    each patient counts once (the mean over their volumes). A cell with fewer than
    ``max(min_cell_size, MIN_SUBGROUP_SIZE)`` patients is left out entirely, and so are the
    complementary cells that would let it be derived from the site's totals
    (``_suppressed_cells``); within a kept cell
    the HD95 mean is None when fewer than that many patients have a defined HD95. Patients
    missing from ``groups`` are counted as ``unknown`` in every attribute. Cells are sorted by
    attribute, then value, so the message does not depend on patient order.
    """
    minimum = max(int(min_cell_size), MIN_SUBGROUP_SIZE)
    unknown = PatientGroups(keys.UNKNOWN, keys.UNKNOWN, keys.UNKNOWN, keys.UNKNOWN)
    dice: dict[tuple[str, str], list[float]] = defaultdict(list)
    hd95: dict[tuple[str, str], list[float]] = defaultdict(list)
    for evaluation in evaluations:
        score = patient_dice(evaluation)
        if score is None:
            continue  # no lesion: not part of any Dice, so not counted in any cell
        distance = patient_hd95(evaluation)
        for cell in groups.get(evaluation.patient_key, unknown).items():
            dice[cell].append(score)
            if distance is not None:
                hd95[cell].append(distance)
    suppressed = _suppressed_cells({cell: len(scores) for cell, scores in dice.items()}, minimum)
    cells = []
    for (attribute, value), scores in sorted(dice.items()):
        if (attribute, value) in suppressed:
            continue  # nothing about this cell leaves the site
        distances = hd95.get((attribute, value), [])
        hd95_shown = len(distances) >= minimum
        cells.append(
            SubgroupCell(
                attribute=attribute,
                value=value,
                n=len(scores),
                dice=float(np.mean(scores)),
                hd95_mm=float(np.mean(distances)) if hd95_shown else None,
                n_hd95=len(distances) if hd95_shown else None,
            )
        )
    return cells


def _suppressed_cells(sizes: Mapping[tuple[str, str], int], minimum: int) -> set[tuple[str, str]]:
    """Cells below ``minimum``, plus complementary ones (pure).

    Every attribute splits the same held-out patients, whose totals the site sends anyway
    (``val_lesion_volumes``, ``val_dice``): the suppressed cells of an attribute, taken
    together, are the totals minus the sent cells. So within an attribute the suppressed cells
    must together hold no patient or at least ``minimum``: while they hold fewer, the smallest
    sent cell (ties by value) is suppressed too. One small cell is thus never derivable; what
    can be derived is the union of the suppressed cells, a group of at least ``minimum``.
    """
    suppressed = {cell for cell, n in sizes.items() if n < minimum}
    for attribute in sorted({cell[0] for cell in sizes}):
        cells = sorted((n, cell) for cell, n in sizes.items() if cell[0] == attribute)
        hidden = sum(n for n, cell in cells if cell in suppressed)
        for n, cell in cells:
            if hidden == 0 or hidden >= minimum:
                break
            if cell not in suppressed:
                suppressed.add(cell)
                hidden += n
    return suppressed
