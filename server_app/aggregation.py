"""Weighted FedAvg as pure functions: sites' weights in, the new global weights out.

``fed_avg`` sums in sorted site order, in float64, so a seeded run is bit-for-bit reproducible
whatever the order in which site updates arrived. ``server_step`` then moves the global model
towards that average with a server step size and momentum (FedAvgM); lr 1 and momentum 0 is
plain FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["SiteUpdate", "fed_avg", "server_step"]


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


def server_step(
    global_weights: Mapping[str, np.ndarray],
    averaged: Mapping[str, np.ndarray],
    velocity: Mapping[str, np.ndarray],
    *,
    lr: float,
    momentum: float,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One server update (FedAvgM, Hsu et al. 2019): new global weights and velocity.

    The round's pseudo-gradient is ``averaged - global_weights``; ``v = momentum * v + delta``
    and ``w = global_weights + lr * v``, per floating-point tensor, in float64, cast back to each
    tensor's dtype. ``velocity`` is the previous round's (empty in the first round: zero);
    non-float tensors take the average. ``lr == 1`` and ``momentum == 0`` return ``averaged``
    itself, so plain FedAvg stays bit-identical. The server applies this to what sites sent, so
    under DP it is post-processing: it scales the noise along with the signal and spends nothing.
    """
    if lr == 1.0 and momentum == 0.0:
        return dict(averaged), {}
    weights: dict[str, np.ndarray] = {}
    moved: dict[str, np.ndarray] = {}
    for key, average in averaged.items():
        average = np.asarray(average)
        if average.dtype.kind != "f":
            weights[key] = average
            continue
        current = np.asarray(global_weights[key], dtype=np.float64)
        delta = average.astype(np.float64) - current
        previous = velocity.get(key)
        moved[key] = delta if previous is None else momentum * previous + delta
        weights[key] = (current + lr * moved[key]).astype(average.dtype)
    return weights, moved
