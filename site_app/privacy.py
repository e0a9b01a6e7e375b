"""Patient-level DP-SGD at a site: Opacus made private once per job, epsilon summed over rounds.

The accountant's history lives on disk (``DPState``) because FLARE's simulator may restart a site
process between rounds; epsilon is always computed from the whole job's history. Per-sample
gradients come from Opacus, in one of its modes or in fedseg's "grouped" mode (Opacus's hooks
with faster samplers for convolutions and PReLU, ``site_app.dp_samplers``; clipping, noise and
accounting stay Opacus's).
"""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.data_loader import DPDataLoader

from jobs.atomic_files import atomic_write
from jobs.spec import Accountant, GradSampleMode, PrivacySpec
from site_app.dp_samplers import wrap_private

__all__ = [
    "DPSettings",
    "DPState",
    "PrivateTraining",
    "dp_loader",
    "epsilon_spent",
    "projected_epsilon",
    "release_patient_count",
    "resolve_dp_settings",
    "unseeded_generator",
]

# (noise_multiplier, sample_rate, steps): the accountant's own history format.
HistoryEntry = tuple[float, float, int]


@dataclass(frozen=True)
class DPSettings:
    """What one site's DP-SGD runs with for the whole job.

    Every number here is a function of the spec and of ``released_patients`` (the site's
    patient count with DP noise, itself a DP release): none depends on the exact count, so the
    guarantee holds for adding or removing one patient (``docs/privacy.md``).
    """

    noise_multiplier: float
    """Gaussian noise std as a multiple of max_grad_norm."""
    max_grad_norm: float
    """Per-patient L2 clipping bound."""
    sample_rate: float
    """Poisson probability that a training patient is in a step: 1 / steps_per_epoch."""
    steps_per_epoch: int
    """ceil(released_patients / batch_size): the DP loader runs exactly this many steps."""
    steps_per_round: int
    expected_batch_size: float
    """released_patients / steps_per_epoch: what the noised gradient sum is divided by."""
    released_patients: int
    """The patient count the site publishes: the true count plus Gaussian noise, rounded."""
    count_noise_std: float
    """Std of that noise, in patients (the count has sensitivity 1)."""
    delta: float
    accountant: Accountant
    grad_sample_mode: GradSampleMode
    secure_noise: bool = True
    """Opacus's floating-point-safe noise (four samples per value); off only in benchmarks."""

    @property
    def count_release(self) -> HistoryEntry:
        """The count's Gaussian mechanism in the accountant's history format (q = 1, 1 step)."""
        return (self.count_noise_std, 1.0, 1)

    def job_history(self, rounds: int) -> list[HistoryEntry]:
        """Every mechanism of a whole job of ``rounds`` rounds, in the order they run."""
        return [
            self.count_release,
            (self.noise_multiplier, self.sample_rate, self.steps_per_round * rounds),
        ]


def release_patient_count(patients: int, *, noise_std: float, generator: torch.Generator) -> int:
    """``patients`` + N(0, noise_std²), rounded, at least 1: the site's published count.

    Adding or removing one patient changes the count by 1 (sensitivity 1), so this is the
    Gaussian mechanism with noise multiplier ``noise_std``; its cost is in the job's epsilon.
    """
    noise = torch.randn((), generator=generator, device=generator.device).item()
    return max(1, round(patients + noise_std * noise))


def _calibrated_noise(
    target: float,
    *,
    delta: float,
    before: list[HistoryEntry],
    sample_rate: float,
    steps: int,
    accountant: Accountant,
) -> float:
    """The smallest noise multiplier (to 0.1%) whose job epsilon, after ``before``, is at most
    ``target``: a bisection on the accountant itself, so the target is never exceeded."""

    def epsilon(noise: float) -> float:
        return epsilon_spent(
            [*before, (noise, sample_rate, steps)], accountant=accountant, delta=delta
        )

    floor = epsilon_spent(before, accountant=accountant, delta=delta) if before else 0.0
    if floor >= target:
        raise ValueError(
            f"privacy.target_epsilon {target:g}: the patient-count release alone spends "
            f"{floor:.3f}; raise privacy.count_noise_std or the target"
        )
    low, high = 0.0, 1.0
    while epsilon(high) > target:
        low, high = high, high * 2
        if high > 1e6:
            raise ValueError(f"privacy.target_epsilon {target:g} cannot be reached")
    while high - low > 1e-3 * high:
        middle = (low + high) / 2
        if epsilon(middle) > target:
            low = middle
        else:
            high = middle
    return high


def resolve_dp_settings(
    privacy: PrivacySpec,
    *,
    released_patients: int,
    batch_size: int,
    local_epochs: int,
    rounds: int,
) -> DPSettings:
    """Fix noise, sampling rate and steps for the job from the spec and the *released* count;
    a target_epsilon covers the count release and all rounds at once."""
    if released_patients < 1:
        raise ValueError("DP training needs a released patient count of at least 1")
    steps_per_epoch = math.ceil(released_patients / min(batch_size, released_patients))
    sample_rate = 1.0 / steps_per_epoch
    steps_per_round = steps_per_epoch * local_epochs
    count_entry = (privacy.count_noise_std, 1.0, 1)
    if privacy.target_epsilon is not None:
        noise = _calibrated_noise(
            privacy.target_epsilon,
            delta=privacy.delta,
            before=[count_entry],
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
        steps_per_epoch=steps_per_epoch,
        steps_per_round=steps_per_round,
        expected_batch_size=released_patients / steps_per_epoch,
        released_patients=released_patients,
        count_noise_std=privacy.count_noise_std,
        delta=privacy.delta,
        accountant=privacy.accountant.value,
        grad_sample_mode=privacy.grad_sample_mode.value,
    )


def dp_loader(dataset, settings: DPSettings, *, generator: torch.Generator) -> DPDataLoader:
    """Opacus's Poisson loader over ``dataset`` at ``settings.sample_rate``, running exactly
    ``settings.steps_per_epoch`` steps an epoch (Opacus would run int(1 / rate), which float
    rounding makes one fewer for some sizes, e.g. 92 for 93), so the accountant records the
    rate and the steps that were projected."""
    loader = DPDataLoader(dataset, sample_rate=settings.sample_rate, generator=generator)
    loader.batch_sampler.steps = settings.steps_per_epoch
    return loader


def epsilon_spent(history: list[HistoryEntry], *, accountant: Accountant, delta: float) -> float:
    """Epsilon of everything in ``history`` (0.0 when nothing has been spent)."""
    if not history:
        return 0.0
    acct = create_accountant(mechanism=accountant)
    acct.history = [tuple(entry) for entry in history]
    # The RDP-to-(epsilon, delta) conversion can dip below 0 for a very small spend (one count
    # release with much noise); epsilon is never negative.
    return max(0.0, float(acct.get_epsilon(delta=delta)))


def projected_epsilon(history: list[HistoryEntry], settings: DPSettings, steps: int) -> float:
    """Epsilon the site would have after ``steps`` more steps with ``settings`` (pure)."""
    extra = (settings.noise_multiplier, settings.sample_rate, steps)
    return epsilon_spent([*history, extra], accountant=settings.accountant, delta=settings.delta)


def unseeded_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the OS entropy pool: for deployments, where noise is never seeded.

    torch's default generator starts from a fixed seed in every process, so "not calling
    manual_seed" would make DP noise predictable; this never does that. ``device`` is where the
    numbers are drawn (Opacus draws the noise on the parameters' device).
    """
    seed = int.from_bytes(os.urandom(8), "little")
    return torch.Generator(device=device).manual_seed(seed)


@dataclass
class DPState:
    """What must survive a site process restart within one job."""

    history: list[HistoryEntry] = field(default_factory=list)
    rounds_done: int = 0
    released_patients: int | None = None
    """The DP-noised patient count this job published (drawn once; re-drawing would be a
    second release)."""
    rng_states: dict[str, object] = field(default_factory=dict)
    optimizer: dict | None = None
    """The local optimizer's ``state_dict()`` after the last round (Adam's moments), or None.
    With DP it is computed from noised gradients only, so keeping it is post-processing."""

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "history": self.history,
            "rounds_done": self.rounds_done,
            "released_patients": self.released_patients,
            "rng": self.rng_states,
            "optimizer": self.optimizer,
        }
        # Durable: the accountant history is what makes the next round's epsilon compose.
        atomic_write(path, lambda handle: torch.save(state, handle), durable=True)

    @classmethod
    def load(cls, path: Path) -> DPState:
        """The saved state, read with ``weights_only=True``: tensors, numbers, strings and
        containers only, so a planted or altered state file cannot run code at the site."""
        if not path.exists():
            return cls()
        try:
            raw = torch.load(path, weights_only=True)
        except pickle.UnpicklingError:
            raise ValueError(
                f"{path}: not a fedseg DP state: it holds objects other than tensors and "
                "numbers, which the site never loads (they could run code); it was not written "
                "by this site's fedseg: remove the job's state folder and run the job again"
            ) from None
        return cls(
            history=[tuple(entry) for entry in raw["history"]],
            rounds_done=int(raw["rounds_done"]),
            released_patients=raw.get("released_patients"),
            rng_states=dict(raw["rng"]),
            optimizer=raw.get("optimizer"),
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
        if not isinstance(data_loader, DPDataLoader):
            raise TypeError("make_private: pass the Poisson loader of dp_loader(...)")
        model, dp_optimizer, loader = wrap_private(
            self._engine,
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=self.settings.noise_multiplier,
            max_grad_norm=self.settings.max_grad_norm,
            poisson_sampling=False,  # the loader is already Poisson, at the released rate
            noise_generator=self.noise_generator,
            grad_sample_mode=self.settings.grad_sample_mode,
        )
        # Opacus divides the noised sum by int(patients x rate): the exact count. Divide by the
        # public expected batch instead, or each step's size would tell the count.
        dp_optimizer.expected_batch_size = self.settings.expected_batch_size
        # Opacus's protection against floating-point attacks on Gaussian noise: each noise value
        # is the sum of four samples over 2 (Holohan & Braghin, arXiv 2107.10138, section 5.1).
        # PrivacyEngine(secure_mode=True) would also need torchcsprng for its own generator; the
        # noise generator here is seeded from os.urandom at every job start instead.
        dp_optimizer.secure_mode = self.settings.secure_noise
        return model, dp_optimizer, loader

    @property
    def history(self) -> list[HistoryEntry]:
        return [tuple(entry) for entry in self._engine.accountant.history]

    def restore_history(self, history: list[HistoryEntry]) -> None:
        self._engine.accountant.history = [tuple(entry) for entry in history]

    def epsilon(self) -> float:
        return epsilon_spent(
            self.history, accountant=self.settings.accountant, delta=self.settings.delta
        )
