"""What a spec's DP will be at a site of N training patients, before any data is read.

``fedseg privacy plan`` prints it for each site; it calls the same functions a site calls at
the start of a job (``resolve_dp_settings`` on the released count), so its sampling rate, steps,
noise and epsilon are what training then runs with (a test holds them equal). The released
count is the true count plus noise of std ``privacy.count_noise_std``, so a site's real numbers
are those of a count within a few of that std of N.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from rich.table import Table

from jobs.model import build_network, trainable_names
from jobs.spec import JobSpec
from site_app.privacy import DPSettings, epsilon_spent, resolve_dp_settings

__all__ = ["MEASURED", "PlanError", "PrivacyPlan", "SitePlan", "plan_privacy", "plan_table"]


class PlanError(ValueError):
    """The spec cannot be planned (e.g. DP is off); the message says what to change."""


@dataclass(frozen=True)
class MeasuredRecipe:
    """A recipe measured on the simulator (docs/researcher.md, "How many patients")."""

    description: str
    trainable: int
    """Trainable scalars of the recipe's network."""
    crops_per_patient: int
    epsilon: float
    server_lr: float
    """The server step (``federation.server_lr``) it was measured with; 1 = plain FedAvg."""
    smallest_site: int | None
    """Smallest training patients per site (3 sites) at which the DP federation reached at
    least 0.9x the Dice of the same federation without DP; None = not reached up to 800."""


MEASURED: tuple[MeasuredRecipe, ...] = (
    MeasuredRecipe(
        description=(
            "jobs/specs/demo.yaml's recipe (outer UNet levels trained, 10 x 2 epochs, batch 32, "
            "server step 2) at epsilon 8, on `fedseg simulate data --sites 3 "
            "--patients-per-site 200 --seed 0`: 1.10x at 25, 0.98x at 50, 0.92x at 100 and "
            "0.81x at 150 training patients per site (there the same federation without DP "
            "learns more)"
        ),
        trainable=4386,
        crops_per_patient=1,
        epsilon=8.0,
        server_lr=2.0,
        smallest_site=25,
    ),
    MeasuredRecipe(
        description=(
            "jobs/specs/demo.yaml's recipe with plain FedAvg (server step 1) at epsilon 8; at "
            "400 and 800 patients no longer (0.72x, 0.67x: there the same federation without "
            "DP learns much more)"
        ),
        trainable=4386,
        crops_per_patient=1,
        epsilon=8.0,
        server_lr=1.0,
        smallest_site=50,
    ),
    MeasuredRecipe(
        description="every parameter trained, 10 x 2 epochs, batch 32, plain FedAvg, at "
        "epsilon 8 (0.75x at 150 patients, the only size measured)",
        trainable=37846,
        crops_per_patient=1,
        epsilon=8.0,
        server_lr=1.0,
        smallest_site=None,
    ),
)
"""From the site-size curves and the lever table of docs/researcher.md ("A private model"); the
planner quotes the measured recipe closest to the spec's."""


@dataclass(frozen=True)
class SitePlan:
    patients: int
    """The site's training patients (standing for its released count)."""
    settings: DPSettings
    epsilon: float
    """Whole-job epsilon at ``settings.delta``: the count release and every DP-SGD step."""

    @property
    def noise_over_clip(self) -> float:
        """Std of the noise on the averaged gradient, in units of the clip norm C: the
        noise multiplier over the expected batch (every coordinate gets this much)."""
        return self.settings.noise_multiplier / self.settings.expected_batch_size


@dataclass(frozen=True)
class PrivacyPlan:
    job: str
    rounds: int
    trainable: int
    parameters: int
    sites: tuple[SitePlan, ...]
    notes: list[str] = field(default_factory=list)

    def index(self, site: SitePlan) -> float:
        """N x epsilon / sqrt(trainable): a crude figure of how much a site can learn."""
        return site.patients * site.epsilon / math.sqrt(self.trainable)


def _closest_measured(
    trainable: int, crops: int, epsilon: float, server_lr: float
) -> MeasuredRecipe | None:
    if not MEASURED:
        return None
    return min(
        MEASURED,
        key=lambda r: (
            abs(math.log(r.trainable / trainable)),
            abs(r.crops_per_patient - crops),
            abs(math.log(r.epsilon / epsilon)),
            abs(math.log(r.server_lr / server_lr)),
        ),
    )


def plan_privacy(spec: JobSpec, *, patients: Sequence[int]) -> PrivacyPlan:
    """The DP each site of ``patients`` training patients would run ``spec`` with."""
    if not spec.privacy.enabled:
        raise PlanError(f"{spec.name}: privacy.enabled is false; there is nothing to plan")
    if not patients or min(patients) < 1:
        raise PlanError("--patients: give each site's number of training patients (>= 1)")
    network = build_network(spec.model)
    chosen = set(trainable_names(network, spec.training.trainable))
    trainable = sum(p.numel() for n, p in network.named_parameters() if n in chosen)
    total = sum(p.numel() for p in network.parameters())
    training = spec.training
    sites = []
    for count in patients:
        settings = resolve_dp_settings(
            spec.privacy,
            released_patients=count,
            batch_size=training.batch_size,
            local_epochs=training.local_epochs,
            rounds=training.rounds,
        )
        epsilon = epsilon_spent(
            settings.job_history(training.rounds),
            accountant=settings.accountant,
            delta=settings.delta,
        )
        sites.append(SitePlan(patients=count, settings=settings, epsilon=epsilon))
    plan = PrivacyPlan(
        job=spec.name,
        rounds=training.rounds,
        trainable=trainable,
        parameters=total,
        sites=tuple(sites),
    )
    plan.notes.append(
        f"each site publishes its count with noise of std {spec.privacy.count_noise_std:g} "
        "patients; its rate and steps are those of that released count, so they may differ "
        "from this plan by one step per epoch"
    )
    epsilon = spec.privacy.target_epsilon or sites[0].epsilon
    measured = _closest_measured(
        trainable, training.crops_per_patient, epsilon, spec.federation.server_lr
    )
    if measured is None:
        plan.notes.append("no measured recipe to compare with (docs/researcher.md)")
    elif measured.smallest_site is None:
        plan.notes.append(
            f"measured on the simulator, {measured.description}: not within 0.9x of the same "
            "federation without DP where measured"
        )
    else:
        plan.notes.append(
            f"measured on the simulator, {measured.description}: first within 0.9x of the same "
            f"federation without DP at {measured.smallest_site} training patients per site "
            "(3 sites)"
        )
    return plan


def plan_table(plan: PrivacyPlan) -> Table:
    table = Table(
        title=(
            f"DP plan — {plan.job}: {plan.rounds} rounds, {plan.trainable:,} of "
            f"{plan.parameters:,} parameters trained"
        )
    )
    for column in (
        "patients",
        "sample rate q",
        "steps (job)",
        "noise σ",
        "expected batch",
        "σ / batch (× C)",
        "ε (job)",
        "δ",
        "N·ε/√d",
    ):
        table.add_column(column, justify="right")
    for site in plan.sites:
        s = site.settings
        table.add_row(
            str(site.patients),
            f"{s.sample_rate:.4g}",
            str(s.steps_per_round * plan.rounds),
            f"{s.noise_multiplier:.3f}",
            f"{s.expected_batch_size:.1f}",
            f"{site.noise_over_clip:.4f}",
            f"{site.epsilon:.3f}",
            f"{s.delta:g}",
            f"{plan.index(site):.2f}",
        )
    return table
