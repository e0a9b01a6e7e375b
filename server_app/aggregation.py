"""Weighted FedAvg as a pure function: sites' weights in, the new global weights out.

Sums in sorted site order, in float64, so a seeded run is bit-for-bit reproducible whatever the
order in which site updates arrived.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["SiteUpdate", "fed_avg"]


@dataclass(frozen=True)
class SiteUpdate:
    """One site's locally trained weights and its aggregation weight (training patients)."""

    site: str
    weights: Mapping[str, np.ndarray]
    num_patients: int


def fed_avg(updates: list[SiteUpdate]) -> dict[str, np.ndarray]:
    """Patient-weighted average of the sites' weights; dtypes of the first update are kept.

    Raises ValueError (naming the site) for an empty list, a zero/negative weight, or weights whose
    keys or shapes differ between sites.
    """
    if not updates:
        raise ValueError("fed_avg: no site updates to aggregate")
    ordered = sorted(updates, key=lambda update: update.site)
    reference = ordered[0]
    for update in ordered:
        if update.num_patients <= 0:
            raise ValueError(
                f"fed_avg: site {update.site!r} sent num_patients={update.num_patients}; "
                "an update must come from at least one patient"
            )
        if set(update.weights) != set(reference.weights):
            missing = sorted(set(reference.weights) ^ set(update.weights))
            raise ValueError(
                f"fed_avg: site {update.site!r} sent different parameters than "
                f"{reference.site!r} (differing keys: {missing[:5]})"
            )
    total = float(sum(update.num_patients for update in ordered))
    averaged: dict[str, np.ndarray] = {}
    for key in sorted(reference.weights):
        shape = np.shape(reference.weights[key])
        accumulator = np.zeros(shape, dtype=np.float64)
        for update in ordered:
            value = np.asarray(update.weights[key])
            if value.shape != shape:
                raise ValueError(
                    f"fed_avg: site {update.site!r} sent {key} with shape {value.shape}, "
                    f"expected {shape}"
                )
            accumulator += value.astype(np.float64) * (update.num_patients / total)
        averaged[key] = accumulator.astype(np.asarray(reference.weights[key]).dtype)
    return averaged
