"""The record of a federated run as the server saw it: per site, per round, plus final metrics.

Typed records (pydantic, unknown keys rejected) saved as plain JSON (``history.json``), so
reports can be rebuilt from a saved run without FLARE. The models are the file's schema: its
keys are their fields, in this order. A file is validated once, when read; a bad one raises
``HistoryError`` naming the file, each field, what was expected and what was found.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jobs.atomic_files import atomic_write
from jobs.messages import SiteResultMeta
from jobs.validation_errors import format_validation_error

__all__ = [
    "CrossSiteResult",
    "HistoryError",
    "RoundPhase",
    "RunHistory",
    "SiteRound",
    "read_history",
    "write_history",
]


class HistoryError(ValueError):
    """A saved run history cannot be read; the message names the file and each bad field."""


class RoundPhase(StrEnum):
    """Which kind of round a ``SiteRound`` reports (saved as its string)."""

    TRAIN = "train"
    """A training round: the validation of the global model a site received, then training."""
    FINAL = "final"
    """The validation of the final global model."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class SiteRound(_Record):
    """One site's report for one round (metrics of the model it received, then its training)."""

    model_config = ConfigDict(frozen=True)

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
    phase: RoundPhase = RoundPhase.TRAIN
    val_hd95_mm: float | None = None
    """Mean 95th-percentile Hausdorff distance (mm) over held-out volumes where it is defined."""
    val_hd95_missing: int | None = None
    """Held-out lesion volumes with an empty prediction: HD95 undefined, not averaged in."""
    val_lesion_volumes: int | None = None
    """Held-out volumes with a lesion: the volumes Dice is the mean over."""
    subgroups: list[dict[str, Any]] | None = None
    """Final phase only: the site's subgroup cells (``jobs.messages.SubgroupCell`` as plain
    data); small cells never arrive (the site drops them)."""
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
    def from_meta(
        cls,
        site: str,
        round_index: int,
        meta: SiteResultMeta | Mapping[str, Any],
        phase: RoundPhase = RoundPhase.TRAIN,
    ) -> SiteRound:
        """The record of a site's result metadata: a ``jobs.messages.SiteResultMeta``, or the
        plain meta as received, validated by it (``MessageError`` for a malformed value; keys
        it does not know are ignored)."""
        result = meta
        if not isinstance(result, SiteResultMeta):
            result = SiteResultMeta.from_meta(meta, source=str(site))
        return cls(
            site=site,
            round=round_index,
            val_dice=result.val_dice,
            val_patients=result.val_patients,
            num_patients=result.num_patients,
            num_steps=result.num_steps,
            train_loss=result.train_loss,
            epsilon=result.epsilon,
            delta=result.delta,
            refused=result.refused,
            elapsed_s=result.elapsed_s,
            budget_left=result.budget_left,
            phase=phase,
            val_hd95_mm=result.val_hd95_mm,
            val_hd95_missing=result.val_hd95_missing,
            val_lesion_volumes=result.val_lesion_volumes,
            subgroups=(
                None if result.subgroups is None else [c.to_meta() for c in result.subgroups]
            ),
            noise_multiplier=result.noise_multiplier,
            sample_rate=result.sample_rate,
            count_noise_std=result.count_noise_std,
            accountant=result.accountant,
            ledger_entries=result.ledger_entries,
            ledger_head=result.ledger_head,
        )

    @classmethod
    def rejected(
        cls, site: str, round_index: int, reason: str, phase: RoundPhase = RoundPhase.TRAIN
    ) -> SiteRound:
        """A result the server could not accept (malformed metadata): counted as a refusal
        with ``reason``, contributing nothing."""
        return cls.absent(site, round_index, phase).model_copy(
            update={"missing": False, "refused": reason}
        )

    @classmethod
    def absent(cls, site: str, round_index: int, phase: RoundPhase = RoundPhase.TRAIN) -> SiteRound:
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


class CrossSiteResult(_Record):
    """One cell of the cross-site matrix: ``model`` evaluated on ``site``'s held-out patients.

    ``model`` is ``jobs.keys.GLOBAL_MODEL`` for the final global model, else the site whose last
    local model (sent after round ``model_round``, 0-based) was evaluated.
    """

    model_config = ConfigDict(frozen=True)

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


class RunHistory(_Record):
    """The whole run: written by the server's controller as it goes, read by the report."""

    job_name: str
    sites: list[str]
    rounds_planned: int
    rounds: list[SiteRound] = Field(default_factory=list)
    final: list[SiteRound] = Field(default_factory=list)
    """Validation of the final global model at each site (round == rounds completed)."""
    rounds_completed: int = 0
    best_round: int | None = None
    """Index of the global model with the best mean validation Dice (0 = untrained start)."""
    stopped_reason: str | None = None
    cross_site: list[CrossSiteResult] = Field(default_factory=list)
    """Every site's last local model (and the final global model) on every site's held-out
    patients."""
    cross_site_not_shared: dict[str, str] = Field(default_factory=dict)
    """Sites whose local model was not sent to other sites, with the reason."""
    spec: dict[str, Any] | None = None
    """The job spec as plain data, so a report can be rebuilt from this file alone."""

    def last_epsilon(self) -> dict[str, float]:
        """Each site's epsilon after its latest training round that reported one (sites that
        reported none are absent): what the site has spent in this job so far."""
        epsilon: dict[str, float] = {}
        for record in sorted(self.rounds, key=lambda r: r.round):
            if record.epsilon is not None:
                epsilon[record.site] = record.epsilon
        return epsilon

    def to_json(self) -> dict:
        """Plain JSON types only (enums as their values, tuples as lists), so the same dict can
        be written to history.json and sent as a FLARE answer: FLARE drops an answer holding an
        enum."""
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, data: object, *, source: str = "run history") -> RunHistory:
        """Validate plain data (parsed history.json); ``source`` names it in a HistoryError."""
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise HistoryError(
                format_validation_error(
                    error,
                    source,
                    document="the run history",
                    unknown_key="unknown key (not a field of this fedseg's run history)",
                    fix="the file was edited or written by another fedseg version; restore it or "
                    "re-run the job",
                )
            ) from None


def write_history(history: RunHistory, path: Path) -> None:
    text = json.dumps(history.to_json(), indent=2)
    atomic_write(path, text.encode(), durable=False, mode=0o644)


def read_history(path: Path) -> RunHistory:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise HistoryError(
            f"{path}: not valid JSON ({error}); it is not a run history (history.json)"
        ) from None
    return RunHistory.from_json(data, source=str(path))
