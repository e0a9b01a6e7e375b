"""The record of a federated run as the server saw it: per site, per round, plus final metrics.

Plain data (JSON) so reports can be rebuilt from a saved run without FLARE.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from jobs import keys
from jobs.atomic_files import atomic_write

__all__ = ["CrossSiteResult", "RunHistory", "SiteRound", "read_history", "write_history"]


@dataclass(frozen=True, kw_only=True)
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
    val_hd95_mm: float | None = None
    """Mean 95th-percentile Hausdorff distance (mm) over held-out volumes where it is defined."""
    val_hd95_missing: int | None = None
    """Held-out lesion volumes with an empty prediction: HD95 undefined, not averaged in."""
    val_lesion_volumes: int | None = None
    """Held-out volumes with a lesion: the volumes Dice is the mean over."""
    subgroups: list[dict] | None = None
    """Final phase only: the site's subgroup cells (``jobs.keys.CELL_*``); small cells never
    arrive (the site drops them)."""
    noise_multiplier: float | None = None
    """DP-SGD's noise multiplier (the same every round of a job)."""
    sample_rate: float | None = None
    """DP-SGD's Poisson rate; with ``num_steps`` per round and the count release, everything
    an independent accountant needs to recompute ``epsilon``."""
    count_noise_std: float | None = None
    """Std of the noise on ``num_patients`` (a DP release: one Gaussian step at rate 1)."""
    accountant: str | None = None
    ledger_entries: int | None = None
    """Entries in the site's epsilon ledger after this round, and the start of its last entry's
    hash: a count that falls between rounds or jobs shows a ledger rolled back."""
    ledger_head: str | None = None

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
            val_hd95_mm=meta.get(keys.VAL_HD95_MM),
            val_hd95_missing=meta.get(keys.VAL_HD95_MISSING),
            val_lesion_volumes=meta.get(keys.VAL_LESION_VOLUMES),
            subgroups=meta.get(keys.SUBGROUPS),
            noise_multiplier=meta.get(keys.NOISE_MULTIPLIER),
            sample_rate=meta.get(keys.SAMPLE_RATE),
            count_noise_std=meta.get(keys.COUNT_NOISE_STD),
            accountant=meta.get(keys.ACCOUNTANT),
            ledger_entries=meta.get(keys.LEDGER_ENTRIES),
            ledger_head=meta.get(keys.LEDGER_HEAD),
        )

    @classmethod
    def absent(cls, site: str, round_index: int, phase: str = "train") -> SiteRound:
        unknown = dict.fromkeys(
            (
                "val_dice",
                "val_patients",
                "num_patients",
                "num_steps",
                "train_loss",
                "epsilon",
                "delta",
            )
        )
        return cls(site=site, round=round_index, missing=True, phase=phase, **unknown)


@dataclass(frozen=True)
class CrossSiteResult:
    """One cell of the cross-site matrix: ``model`` evaluated on ``site``'s held-out patients.

    ``model`` is ``jobs.keys.GLOBAL_MODEL`` for the final global model, else the site whose last
    local model (sent after round ``model_round``, 0-based) was evaluated.
    """

    model: str
    model_round: int | None
    site: str
    val_dice: float | None
    val_hd95_mm: float | None
    val_hd95_missing: int | None
    val_lesion_volumes: int | None
    val_patients: int | None
    refused: str | None = None
    missing: bool = False


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
    cross_site: list[CrossSiteResult] = field(default_factory=list)
    """Every site's last local model (and the final global model) on every site's held-out
    patients."""
    cross_site_not_shared: dict[str, str] = field(default_factory=dict)
    """Sites whose local model was not sent to other sites, with the reason."""
    spec: dict | None = None
    """The job spec as plain data, so a report can be rebuilt from this file alone."""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> RunHistory:
        data = dict(data)
        data["rounds"] = [SiteRound(**item) for item in data["rounds"]]
        data["final"] = [SiteRound(**item) for item in data["final"]]
        data["cross_site"] = [CrossSiteResult(**item) for item in data.get("cross_site", [])]
        return cls(**data)


def write_history(history: RunHistory, path: Path) -> None:
    text = json.dumps(history.to_json(), indent=2)
    atomic_write(path, text.encode(), durable=False, mode=0o644)


def read_history(path: Path) -> RunHistory:
    return RunHistory.from_json(json.loads(Path(path).read_text()))
