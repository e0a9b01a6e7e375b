"""report.json's schema: the run report as typed records (pydantic, unknown keys rejected).

Other tools read report.json, so its keys are stable: they are the fields below, in this order.
Only what the server received is in it: counts, metrics and epsilon per site, and subgroup
cells the sites chose to send; nothing patient-level exists at the server to leak. Dice is a
fraction in [0, 1], HD95 is in mm at the job's ``data.target_spacing_mm``, epsilon and delta
are (epsilon, delta)-DP per patient of a site.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from jobs.validation_errors import format_validation_error
from server_app.history import SiteRound

__all__ = [
    "Accounting",
    "CrossSite",
    "CrossSiteCell",
    "GapEnd",
    "Mechanism",
    "ModelSummary",
    "PooledCell",
    "Refusal",
    "Report",
    "ReportError",
    "RoundRef",
    "SiteSummary",
    "SubgroupCell",
    "SubgroupGap",
    "Subgroups",
]


class ReportError(Exception):
    """Saved results cannot be turned into a report; the message names the file at fault."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class Mechanism(_Record):
    """One DP mechanism a site ran in this job, with what an accountant needs to compose it."""

    mechanism: str
    noise_multiplier: float | None
    sample_rate: float | None
    steps: int


class Accounting(_Record):
    """A DP site's mechanisms in the order they ran: everything an independent accountant needs
    to recompute ``epsilon``."""

    accountant: str | None
    delta: float | None
    epsilon: float | None
    mechanisms: list[Mechanism]


class SiteSummary(_Record):
    """One site's row: patients, the untrained and final global model's metrics, epsilon."""

    site: str
    train_patients: int | None
    val_patients: int | None
    untrained_dice: float | None
    final_dice: float | None
    final_hd95_mm: float | None
    """Mean 95th-percentile Hausdorff distance (mm) where defined."""
    final_hd95_missing: int | None
    """Lesion volumes with an empty prediction: HD95 undefined there, not averaged in."""
    final_lesion_volumes: int | None
    """Volumes Dice is averaged over."""
    epsilon: float | None
    """Spent in this job, as last reported."""
    budget_left: float | None
    delta: float | None
    accounting: Accounting | None
    """DP jobs only."""


CellStatus = Literal["ok", "refused", "missing"]


class CrossSiteCell(_Record):
    """``model`` evaluated on ``site``'s held-out patients."""

    model: str
    model_round: int | None
    site: str
    dice: float | None
    hd95_mm: float | None
    hd95_missing: int | None
    val_patients: int | None
    status: CellStatus


class CrossSite(_Record):
    """The cross-site matrix: models (rows) x sites (columns)."""

    models: list[str]
    """Row order: ``"global"`` then the sites whose local model was evaluated."""
    sites: list[str]
    cells: list[CrossSiteCell]
    not_shared: dict[str, str]
    """{site: reason} for local models a site did not allow to be sent to other sites."""


class SubgroupCell(_Record):
    """A subgroup cell as a site sent it (a cell it did not send had fewer than
    ``min_cell_size`` patients there, or none)."""

    site: str
    attribute: str
    value: str
    n: int
    dice: float | None
    hd95_mm: float | None
    n_hd95: int | None


class PooledCell(_Record):
    """One (attribute, value) over the sites that sent it, weighted by ``n`` (``n_hd95`` for
    HD95)."""

    attribute: str
    value: str
    n: int
    sites: list[str]
    dice: float | None
    hd95_mm: float | None
    n_hd95: int | None


class GapEnd(_Record):
    value: str
    dice: float
    hd95_mm: float | None
    n: int


class SubgroupGap(_Record):
    """Per attribute, the best and worst pooled Dice among known values; ``gap`` = their
    difference."""

    attribute: str
    metric: Literal["dice"]
    best: GapEnd
    worst: GapEnd
    gap: float


class Subgroups(_Record):
    min_cell_size: int
    attributes: dict[str, list[str]]
    """{attribute: values shown}, in display order."""
    per_site: list[SubgroupCell]
    pooled: list[PooledCell]
    largest_gap: list[SubgroupGap]


class ModelSummary(_Record):
    """The signed manifest's summary."""

    file: str | None
    sha256: str | None
    signer_kind: str | None
    signer_subject: str | None
    created_utc: str | None
    fedseg_version: str | None
    contributing_sites: list[str] | None


class Refusal(_Record):
    site: str
    round: int
    reason: str


class RoundRef(_Record):
    """A round a site did not answer."""

    site: str
    round: int


class Report(_Record):
    """Everything a researcher needs from one run (report.json)."""

    job: str
    sites: list[str]
    rounds_planned: int
    rounds_completed: int
    stopped_reason: str | None
    best_round: int | None
    """Global model index with the best mean validation Dice, 0 = untrained."""
    privacy: dict[str, Any] | None
    """The spec's privacy section."""
    wall_time_s: float | None
    per_site: list[SiteSummary]
    rounds: list[SiteRound]
    """Every SiteRound as sent (``val_dice`` is for the model the site *received*)."""
    cross_site: CrossSite
    subgroups: Subgroups
    model: ModelSummary | None
    """None when no manifest was found beside the final model."""
    refusals: list[Refusal]
    missing: list[RoundRef]
    spec: dict[str, Any]
    """The whole spec."""
    plots: list[str] = []
    """PNG file names written beside report.json."""

    def to_json(self) -> dict:
        return self.model_dump()

    @classmethod
    def from_json(cls, data: object, *, source: str = "report") -> Report:
        """Validate plain data (parsed report.json); ``source`` names it in a ReportError."""
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise ReportError(
                format_validation_error(
                    error,
                    source,
                    document="the report",
                    unknown_key="unknown key (not a field of this fedseg's report)",
                    fix=f"the file was edited or written by another fedseg version; move {source} "
                    "away to rebuild without it (its wall time is then lost)",
                )
            ) from None
