"""Patient-level DP-SGD at a site: Opacus made private once per job, epsilon summed over rounds.

The accountant's history lives on disk (``DPState``) because FLARE's simulator may restart a site
process between rounds; epsilon is always computed from the whole job's history.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from jobs.spec import PrivacySpec

__all__ = [
    "DPSettings",
    "DPState",
    "PrivateTraining",
    "epsilon_spent",
    "projected_epsilon",
    "resolve_dp_settings",
    "unseeded_generator",
]

# (noise_multiplier, sample_rate, steps): the accountant's own history format.
HistoryEntry = tuple[float, float, int]


@dataclass(frozen=True)
class DPSettings:
    """What one site's DP-SGD runs with for the whole job."""

    noise_multiplier: float
    """Gaussian noise std as a multiple of max_grad_norm."""
    max_grad_norm: float
    """Per-patient L2 clipping bound."""
    sample_rate: float
    """Poisson probability that a training patient is in a step: 1 / ceil(patients / batch_size)."""
    steps_per_round: int
    delta: float
    accountant: str
    grad_sample_mode: str


def resolve_dp_settings(
    privacy: PrivacySpec, *, num_patients: int, batch_size: int, local_epochs: int, rounds: int
) -> DPSettings:
    """Fix noise, sampling rate and steps for the job; target_epsilon covers all rounds at once."""
    if num_patients < 1:
        raise ValueError("DP training needs at least one training patient at the site")
    # Exactly Opacus's DPDataLoader convention (sample_rate = 1 / len(loader)), so what we
    # project and enforce is what the accountant will record.
    steps_per_epoch = math.ceil(num_patients / min(batch_size, num_patients))
    sample_rate = 1.0 / steps_per_epoch
    steps_per_round = steps_per_epoch * local_epochs
    if privacy.target_epsilon is not None:
        noise = get_noise_multiplier(
            target_epsilon=privacy.target_epsilon,
            target_delta=privacy.delta,
            sample_rate=sample_rate,
            steps=steps_per_round * rounds,
            accountant=privacy.accountant.value,
        )
    else:
        noise = float(privacy.noise_multiplier)
    return DPSettings(
        noise_multiplier=float(noise),
        max_grad_norm=privacy.max_grad_norm,
        sample_rate=sample_rate,
        steps_per_round=steps_per_round,
        delta=privacy.delta,
        accountant=privacy.accountant.value,
        grad_sample_mode=privacy.grad_sample_mode.value,
    )


def epsilon_spent(history: list[HistoryEntry], *, accountant: str, delta: float) -> float:
    """Epsilon of everything in ``history`` (0.0 when nothing has been spent)."""
    if not history:
        return 0.0
    acct = create_accountant(mechanism=accountant)
    acct.history = [tuple(entry) for entry in history]
    return float(acct.get_epsilon(delta=delta))


def projected_epsilon(history: list[HistoryEntry], settings: DPSettings, steps: int) -> float:
    """Epsilon the site would have after ``steps`` more steps with ``settings`` (pure)."""
    extra = (settings.noise_multiplier, settings.sample_rate, steps)
    return epsilon_spent([*history, extra], accountant=settings.accountant, delta=settings.delta)


def unseeded_generator() -> torch.Generator:
    """A generator seeded from the OS entropy pool: for deployments, where noise is never seeded.

    torch's default generator starts from a fixed seed in every process, so "not calling
    manual_seed" would make DP noise predictable; this never does that.
    """
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


@dataclass
class DPState:
    """What must survive a site process restart within one job."""

    history: list[HistoryEntry] = field(default_factory=list)
    rounds_done: int = 0
    rng_states: dict[str, object] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(
            {"history": self.history, "rounds_done": self.rounds_done, "rng": self.rng_states},
            tmp,
        )
        tmp.replace(path)  # atomic: a crash mid-write never leaves a half-written ledger

    @classmethod
    def load(cls, path: Path) -> DPState:
        if not path.exists():
            return cls()
        raw = torch.load(path, weights_only=False)
        return cls(
            history=[tuple(entry) for entry in raw["history"]],
            rounds_done=int(raw["rounds_done"]),
            rng_states=dict(raw["rng"]),
        )


class PrivateTraining:
    """Opacus DP-SGD for one job in one process; ``make_private`` is called exactly once."""

    def __init__(self, settings: DPSettings, *, noise_generator: torch.Generator) -> None:
        self.settings = settings
        self.noise_generator = noise_generator
        self._engine = PrivacyEngine(accountant=settings.accountant)
        self._made_private = False

    def make_private(self, *, module, optimizer, data_loader):
        """Wrap model, optimizer and loader (Poisson sampling over patients). Once per process."""
        if self._made_private:
            raise RuntimeError("make_private was already called in this process for this job")
        self._made_private = True
        return self._engine.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=self.settings.noise_multiplier,
            max_grad_norm=self.settings.max_grad_norm,
            poisson_sampling=True,
            noise_generator=self.noise_generator,
            grad_sample_mode=self.settings.grad_sample_mode,
        )

    @property
    def history(self) -> list[HistoryEntry]:
        return [tuple(entry) for entry in self._engine.accountant.history]

    def restore_history(self, history: list[HistoryEntry]) -> None:
        self._engine.accountant.history = [tuple(entry) for entry in history]

    def epsilon(self) -> float:
        return epsilon_spent(
            self.history, accountant=self.settings.accountant, delta=self.settings.delta
        )
