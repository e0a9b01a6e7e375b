"""Patient-level DP-SGD at a site: Opacus made private once per job, epsilon summed over rounds.

The accountant's history lives on disk (``DPState``) because FLARE's simulator may restart a site
process between rounds; epsilon is always computed from the whole job's history. Per-sample
gradients come from Opacus, in one of its modes or in fedseg's "grouped" mode (Opacus's hooks
with faster samplers for convolutions and PReLU; clipping, noise and accounting stay Opacus's).
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
from opacus.grad_sample import GradSampleModule
from torch import nn

from jobs.atomic_files import atomic_write
from jobs.spec import PrivacySpec

__all__ = [
    "GROUPED",
    "DPSettings",
    "DPState",
    "PrivateTraining",
    "dp_loader",
    "epsilon_spent",
    "projected_epsilon",
    "release_patient_count",
    "resolve_dp_settings",
    "unseeded_generator",
    "wrap_private",
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
    accountant: str
    grad_sample_mode: str
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
    accountant: str,
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


def epsilon_spent(history: list[HistoryEntry], *, accountant: str, delta: float) -> float:
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


# -- per-sample gradients ------------------------------------------------------------------------

GROUPED = "grouped"
"""fedseg's per-sample-gradient mode: Opacus's hooks mode with the samplers below for
convolutions and PReLU (measured in benchmarks/dp_overhead.py; docs/performance.md)."""


def _fold_batch_into_channels(tensor: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) -> (1, B*C, *spatial), channel b*C + c = sample b's channel c.

    A channels-last input stays channels-last (one copy, like the layer's own kernels); a
    contiguous one is a free view.
    """
    if tensor.dim() == 5 and tensor.is_contiguous(memory_format=torch.channels_last_3d):
        batch, channels, *spatial = tensor.shape
        # Physical (B, D, H, W, C) -> (D, H, W, B, C), then view the last two axes as one.
        folded = tensor.permute(2, 3, 4, 0, 1).contiguous().view(*spatial, batch * channels)
        return folded.permute(3, 0, 1, 2).unsqueeze(0)
    return tensor.reshape(1, -1, *tensor.shape[2:])


def _conv_per_sample_grads(
    layer: nn.modules.conv._ConvNd, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample weight (B, *weight.shape) and bias (B, C_out) gradients of a (transposed) conv.

    ``activations[0]`` is the layer's input (B, C_in, *spatial), ``backprops`` the loss
    gradient at its output (B, C_out, *spatial'), scaled by Opacus to one sample's loss. One
    grouped ``convolution_backward`` call computes every sample's weight gradient and nothing
    else: the batch is folded into the channel axis (B samples = B groups), so sample b's
    gradient is built from sample b's tensors alone. Opacus's own conv sampler unfolds k³
    patches (im2col); its functorch fallback re-runs each layer's forward pass.
    """
    activation = activations[0].to(backprops.dtype)
    batch = activation.shape[0]
    transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
    grads: dict[nn.Parameter, torch.Tensor] = {}
    weight = layer.weight
    if weight.requires_grad:
        if batch == 0:
            grads[weight] = weight.new_zeros((0, *weight.shape))
        else:
            spatial_dims = activation.dim() - 2
            folded_weight = weight.detach().repeat(batch, *([1] * (weight.dim() - 1)))
            if weight.dim() == 5 and activation.is_contiguous(memory_format=torch.channels_last_3d):
                folded_weight = folded_weight.contiguous(memory_format=torch.channels_last_3d)
            _, grad_weight, _ = torch.ops.aten.convolution_backward(
                _fold_batch_into_channels(backprops),
                _fold_batch_into_channels(activation),
                folded_weight,  # only its shape (B x the weight's first axis) is read
                None,
                layer.stride,
                layer.padding,
                layer.dilation,
                transposed,
                layer.output_padding if transposed else (0,) * spatial_dims,
                layer.groups * batch,
                (False, True, False),
            )
            grads[weight] = grad_weight.reshape(batch, *weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = backprops.sum(dim=tuple(range(2, backprops.dim())))
    return grads


def _prelu_per_sample_grads(
    layer: nn.PReLU, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient (B, *weight.shape) of PReLU's slope a in max(0, x) + a * min(0, x).

    d loss_b / d a = sum of min(0, x) * backprop over sample b's positions (one shared a) or
    over each channel's positions (one a per channel, channel axis 1).
    """
    activation = activations[0].to(backprops.dtype)
    contribution = torch.clamp(activation, max=0) * backprops
    if layer.weight.numel() == 1:
        grad = contribution.flatten(1).sum(1).view(-1, *layer.weight.shape)
    else:
        grad = contribution.flatten(2).sum(2)
    return {layer.weight: grad}


def _grouped_sampler(layer: nn.Module, activations, backprops):
    """fedseg's sampler where it applies; Opacus's own sampler (or functorch) elsewhere."""
    if isinstance(layer, nn.PReLU):
        return _prelu_per_sample_grads(layer, activations, backprops)
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        # Padding computed at call time (or non-zero padding) is not what the formula assumes.
        from opacus.grad_sample.functorch import ft_compute_per_sample_gradient

        fallback = GradSampleModule.GRAD_SAMPLERS.get(type(layer), ft_compute_per_sample_gradient)
        return fallback(layer, activations, backprops)
    return _conv_per_sample_grads(layer, activations, backprops)


_GROUPED_LAYERS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.PReLU,
)


def wrap_private(engine: PrivacyEngine, *, grad_sample_mode: str, **make_private_args):
    """``engine.make_private`` for an Opacus mode or for fedseg's ``GROUPED`` mode.

    GROUPED runs Opacus's "hooks" mode and gives the returned GradSampleModule its own sampler
    table (Opacus looks the table up on the module at each backward pass), so only this model
    uses fedseg's samplers; Opacus's global registry is left as it is. Returns what
    ``make_private`` returns for the Opacus mode run.
    """
    opacus_mode = "hooks" if grad_sample_mode == GROUPED else grad_sample_mode
    wrapped = engine.make_private(grad_sample_mode=opacus_mode, **make_private_args)
    if grad_sample_mode == GROUPED:
        module = wrapped[0]
        module.GRAD_SAMPLERS = {
            **GradSampleModule.GRAD_SAMPLERS,
            **dict.fromkeys(_GROUPED_LAYERS, _grouped_sampler),
        }
    return wrapped


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
