"""What the comparison's rows run: each row's privacy variant of the job spec, the sweep's
epsilon list, the training budget every row shares, and the option errors (``CompareError``).
"""

from __future__ import annotations

import math

from jobs.spec import JobSpec, parse_spec
from simulator.baselines import SiteSplit

__all__ = ["CompareError", "parse_epsilons", "privacy_text", "privacy_variant", "training_budget"]


class CompareError(ValueError):
    """A comparison that cannot run as asked; the message names the option and the fix."""


def parse_epsilons(text: str) -> tuple[float, ...]:
    """``"1,4,8,inf"`` -> (1.0, 4.0, 8.0, inf), ascending; ``inf`` means DP off.

    Raises:
        CompareError: empty list, an entry that is not a positive number or ``inf``, or a
            repeated value.
    """
    example = "e.g. --epsilons 1,4,8,inf"
    entries = [entry.strip() for entry in str(text).split(",")]
    if not any(entries):
        raise CompareError(f"--epsilons: expected a comma-separated list, {example}; got nothing")
    values = []
    for entry in entries:
        try:
            value = float(entry)
        except ValueError:
            value = math.nan
        if not entry or math.isnan(value) or value <= 0:
            raise CompareError(
                f"--epsilons: expected positive numbers or inf (DP off), {example}; "
                f"got {entry!r} in {text!r}"
            )
        values.append(value)
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise CompareError(
            f"--epsilons: {', '.join(f'{v:g}' for v in repeated)} appears more than once in "
            f"{text!r}; list each target once"
        )
    return tuple(sorted(values))


def privacy_variant(spec: JobSpec, epsilon: float | None) -> JobSpec:
    """``spec`` with DP off (``epsilon`` = inf), a whole-job target epsilon, or as is (None)."""
    if epsilon is None:
        return spec
    plain = spec.to_plain()
    if math.isinf(epsilon):
        plain["privacy"]["enabled"] = False
    else:
        plain["privacy"].update(enabled=True, target_epsilon=float(epsilon), noise_multiplier=None)
    return parse_spec(plain, source=f"{spec.name} (privacy variant)")


def privacy_text(spec: JobSpec) -> str:
    privacy = spec.privacy
    if not privacy.enabled:
        return "none"
    noise = (
        f"target epsilon {privacy.target_epsilon:g} (whole job)"
        if privacy.target_epsilon is not None
        else f"noise multiplier {privacy.noise_multiplier:g}"
    )
    return f"DP-SGD per patient, {noise}, delta {privacy.delta:g}, {privacy.accountant.value}"


def training_budget(spec: JobSpec, splits: dict[str, SiteSplit]) -> dict:
    """The shared budget, with the patient counts it applies to (plain data)."""
    training = spec.training
    federation = spec.federation
    server_step = ""
    if federation.server_lr != 1.0 or federation.server_momentum != 0.0:
        server_step = (
            f"; the FedAvg rows' server moves the global model {federation.server_lr:g} times the "
            f"sites' average update each round (server momentum {federation.server_momentum:g})"
        )
    return {
        "epochs": training.rounds * training.local_epochs,
        "rounds": training.rounds,
        "local_epochs": training.local_epochs,
        "batch_size": training.batch_size,
        "optimizer": training.optimizer.value,
        "lr": training.lr,
        "lr_schedule": training.lr_schedule.value,
        "server_lr": federation.server_lr,
        "server_momentum": federation.server_momentum,
        "train_patients": {site: len(split.train) for site, split in splits.items()},
        "val_patients": {site: len(split.val) for site, split in splits.items()},
        "definition": (
            "every row trains rounds x local_epochs epochs with the same batch size, optimizer, "
            "learning rate schedule and initial weights (each trainer keeps its optimizer state "
            "across rounds): local-only over each site's own training patients, pooled over the "
            "union of all sites' training patients, FedAvg and FedAvg + DP at every site per round"
            + server_step
        ),
    }
