"""The model factory: the same MONAI network on the server and at every site, from the JobSpec.

Also checks a network against what Opacus can make private, naming the offending submodule.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.networks.nets import SegResNet, UNet
from opacus.validators import ModuleValidator
from torch import nn

from jobs.spec import ModelSpec, Network

__all__ = [
    "build_network",
    "dp_incompatibilities",
    "initial_weights",
    "numpy_to_state",
    "state_to_numpy",
]


def build_network(spec: ModelSpec) -> nn.Module:
    """A 3D binary-segmentation network: input (B, 1, H, W, D), output logits (B, 1, H, W, D)."""
    if spec.network == Network.UNET:
        return UNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=1,
            channels=spec.channels,
            strides=spec.strides,
            num_res_units=spec.num_res_units,
            norm=spec.norm.value,
        )
    if spec.network == Network.SEGRESNET:
        return SegResNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=1,
            init_filters=spec.channels[0],
            blocks_down=tuple(1 for _ in spec.channels),
            blocks_up=tuple(1 for _ in spec.channels[1:]),
            norm=spec.norm.value,
        )
    raise ValueError(f"model.network: unsupported network {spec.network!r}")


def dp_incompatibilities(model: nn.Module) -> list[str]:
    """Every submodule Opacus cannot make private, as 'model.<path>: <Type>: <why>'.

    Opacus's ModuleValidator reports errors without the submodule path; we find the path.
    """
    errors = ModuleValidator.validate(model, strict=False)
    if not errors:
        return []
    problems = [
        f"model.{name}: {type(module).__name__} is not supported with DP "
        "(it mixes patients within a batch); use norm: instance"
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
    ]
    # Anything else Opacus found, in its own words: every message, not one per error type.
    return problems or [f"model: {error}" for error in errors]


def initial_weights(spec: ModelSpec, seed: int | None) -> dict[str, np.ndarray]:
    """Freshly initialised weights as numpy arrays; identical for the same spec and seed."""
    generator_state = torch.random.get_rng_state()
    try:
        if seed is not None:
            torch.manual_seed(seed)
        return state_to_numpy(build_network(spec).state_dict())
    finally:
        torch.random.set_rng_state(generator_state)


def state_to_numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A torch state dict as C-ordered numpy arrays (whatever the tensors' memory format),
    dropping only a *leading* Opacus '_module.' prefix."""
    prefix = "_module."
    arrays = {}
    for key, value in state.items():
        name = key[len(prefix) :] if key.startswith(prefix) else key
        arrays[name] = value.detach().cpu().contiguous().numpy()
    return arrays


def numpy_to_state(weights: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.asarray(value).copy()) for key, value in weights.items()}
