"""The record of a federated run as the server saw it: per site, per round, plus final metrics.

Plain data (JSON) so reports can be rebuilt from a saved run without FLARE.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from jobs import keys

__all__ = ["RunHistory", "SiteRound", "read_history", "write_history"]


@dataclass(frozen=True)
class SiteRound:
    """One site's report for one round (metrics of the model it received, then its training)."""

    site: str
    round: int
    val_dice: float | None
    val_patients: int | None
    num_patients: int | None
    num_steps: int | None
    train_loss: float | None
    epsilon: float | None
    delta: float | None
    refused: str | None = None
    missing: bool = False
    elapsed_s: float | None = None
    budget_left: float | None = None
    """The site's total epsilon budget left after this round (only if its policy sets one)."""
    phase: str = "train"
    """"train" for a training round, "final" for the validation of the final global model."""

    @classmethod
    def from_meta(cls, site: str, round_index: int, meta: dict, phase: str = "train") -> SiteRound:
        return cls(
            site=site,
            round=round_index,
            val_dice=meta.get(keys.VAL_DICE),
            val_patients=meta.get(keys.VAL_PATIENTS),
            num_patients=meta.get(keys.NUM_PATIENTS),
            num_steps=meta.get(keys.NUM_STEPS),
            train_loss=meta.get(keys.TRAIN_LOSS),
            epsilon=meta.get(keys.EPSILON),
            delta=meta.get(keys.DELTA),
            refused=meta.get(keys.REFUSED),
            elapsed_s=meta.get(keys.ELAPSED_S),
            budget_left=meta.get(keys.BUDGET_LEFT),
            phase=phase,
        )

    @classmethod
    def absent(cls, site: str, round_index: int, phase: str = "train") -> SiteRound:
        return cls(
            site, round_index, None, None, None, None, None, None, None, missing=True, phase=phase
        )


@dataclass
class RunHistory:
    job_name: str
    sites: list[str]
    rounds_planned: int
    rounds: list[SiteRound] = field(default_factory=list)
    final: list[SiteRound] = field(default_factory=list)
    """Validation of the final global model at each site (round == rounds completed)."""
    rounds_completed: int = 0
    best_round: int | None = None
    """Index of the global model with the best mean validation Dice (0 = untrained start)."""
    stopped_reason: str | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> RunHistory:
        data = dict(data)
        data["rounds"] = [SiteRound(**item) for item in data["rounds"]]
        data["final"] = [SiteRound(**item) for item in data["final"]]
        return cls(**data)


def write_history(history: RunHistory, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(history.to_json(), indent=2))
    tmp.replace(path)


def read_history(path: Path) -> RunHistory:
    return RunHistory.from_json(json.loads(Path(path).read_text()))
