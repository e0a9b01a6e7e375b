"""The comparison's typed results: which methods run, one scored row per method, the sweep's
points, and the mean-Dice ratios between rows (plain JSON via ``to_json``).

Scores are ``simulator.baselines.SiteScore`` (Dice, HD95 in mm, epsilon per site); means are
unweighted over sites, leaving out sites without a finite score. Also the folder names the
comparison writes under its output folder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum

from simulator.baselines import SiteScore

__all__ = [
    "COMPARE_FOLDER",
    "LABELS",
    "PRIVACY_UTILITY_PLOT",
    "SWEEP_FOLDER",
    "Comparison",
    "Method",
    "MethodResult",
    "SweepPoint",
    "comparison_ratios",
]

COMPARE_FOLDER = "compare"
SWEEP_FOLDER = "sweep"
PRIVACY_UTILITY_PLOT = "privacy_utility.png"


class Method(StrEnum):
    PUBLIC_ONLY = "public_only"
    LOCAL_ONLY = "local_only"
    LOCAL_ONLY_DP = "local_only_dp"
    POOLED = "pooled"
    FEDAVG = "fedavg"
    FEDAVG_DP = "fedavg_dp"


LABELS = {
    Method.PUBLIC_ONLY: "public model only",
    Method.LOCAL_ONLY: "local-only",
    Method.LOCAL_ONLY_DP: "local-only + DP",
    Method.POOLED: "pooled",
    Method.FEDAVG: "FedAvg",
    Method.FEDAVG_DP: "FedAvg + DP",
}


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None and math.isfinite(v)]
    return sum(present) / len(present) if present else None


@dataclass(frozen=True)
class MethodResult:
    """One row: a method's final model(s) scored at every site."""

    method: str
    label: str
    scores: tuple[SiteScore, ...]
    steps: int
    """Optimizer steps taken, summed over sites (the compute the budget bought)."""
    wall_s: float
    run_dir: str
    """Where the run's files are, relative to the comparison's output folder."""
    privacy: str
    """Plain-language privacy of the run: "none" or the DP settings."""

    @property
    def mean_dice(self) -> float | None:
        """Unweighted mean over sites of each site's Dice (sites without a score left out)."""
        return _mean([s.dice for s in self.scores])

    @property
    def mean_hd95_mm(self) -> float | None:
        return _mean([s.hd95_mm for s in self.scores])

    @property
    def max_epsilon(self) -> float | None:
        values = [s.epsilon for s in self.scores if s.epsilon is not None]
        return max(values) if values else None

    def to_json(self) -> dict:
        return {
            **asdict(self),
            "mean_dice": self.mean_dice,
            "mean_hd95_mm": self.mean_hd95_mm,
            "max_epsilon": self.max_epsilon,
        }


@dataclass(frozen=True)
class SweepPoint:
    target_epsilon: float
    """Whole-job epsilon each site may spend; inf = DP off."""
    result: MethodResult


@dataclass
class Comparison:
    job: str
    sites: list[str]
    budget: dict
    rows: list[MethodResult]
    sweep: list[SweepPoint] = field(default_factory=list)
    overlays: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(self, method: Method) -> MethodResult | None:
        return next((row for row in self.rows if row.method == method), None)

    def to_json(self) -> dict:
        return {
            "job": self.job,
            "sites": self.sites,
            "budget": self.budget,
            "rows": [row.to_json() for row in self.rows],
            "ratios": comparison_ratios(self.rows),
            "sweep": [
                {"target_epsilon": _json_epsilon(p.target_epsilon), **p.result.to_json()}
                for p in self.sweep
            ],
            "overlays": self.overlays,
            "notes": self.notes,
        }


def _json_epsilon(value: float) -> float | str:
    return "inf" if math.isinf(value) else value


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def comparison_ratios(rows: Sequence[MethodResult]) -> dict[str, float | None]:
    """Mean-Dice ratios FedAvg / pooled and (FedAvg + DP) / FedAvg, and FedAvg - local-only.

    None where a row is missing or the denominator's mean Dice is 0 or unknown.
    """
    dice = {row.method: row.mean_dice for row in rows}
    fedavg, local = dice.get(Method.FEDAVG), dice.get(Method.LOCAL_ONLY)
    dp, public = dice.get(Method.FEDAVG_DP), dice.get(Method.PUBLIC_ONLY)
    local_dp = dice.get(Method.LOCAL_ONLY_DP)
    return {
        "fedavg_over_pooled": _ratio(fedavg, dice.get(Method.POOLED)),
        "dp_over_fedavg": _ratio(dp, fedavg),
        "fedavg_minus_local_only": None if fedavg is None or local is None else fedavg - local,
        "dp_minus_public_only": None if dp is None or public is None else dp - public,
        "dp_minus_local_only_dp": None if dp is None or local_dp is None else dp - local_dp,
    }
