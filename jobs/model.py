"""The model factory: the same MONAI network on the server and at every site, from the JobSpec.

Also checks a network against what Opacus can make private, naming the offending submodule;
loads the weights a job starts from (``model.init``, checked against its sha256); and chooses
which parameters train (``training.trainable``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.networks.nets import SegResNet, UNet
from opacus.validators import ModuleValidator
from torch import nn

from jobs.spec import ModelSpec, Network

__all__ = [
    "ModelInitError",
    "build_network",
    "dp_incompatibilities",
    "freeze_untrainable",
    "initial_weights",
    "numpy_to_state",
    "state_to_numpy",
    "trainable_names",
    "unmatched_trainable_patterns",
]


class ModelInitError(ValueError):
    """The weights named by ``model.init`` cannot be used; the message names the file and why."""


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
    batch_norms = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
    ]
    problems = [
        f"model.{name}: {type(module).__name__} is not supported with DP "
        "(it mixes patients within a batch); use norm: instance"
        for name, module in batch_norms
    ]
    # Opacus's errors name no module: leave out those its BatchNorm validator gives (named above)
    # and keep anything else it found in its own words, every message, not one per error type.
    named = {
        str(error)
        for _, module in batch_norms
        for error in ModuleValidator.VALIDATORS.get(type(module), lambda _: [])(module)
    }
    return problems + [f"model: {error}" for error in errors if str(error) not in named]


def file_sha256(path: Path) -> str:
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def _load_init(spec: ModelSpec, model_store: Path | None) -> dict[str, np.ndarray]:
    init = spec.init
    if model_store is None:
        raise ModelInitError(
            f"model.init: {init.file} needs a model store to read it from (the server's "
            "local/models/, or the spec's folder in the simulator); none was given"
        )
    path = Path(model_store) / init.file
    if not path.is_file():
        raise ModelInitError(
            f"model.init.file: {path} not found; put the weights file there (its sha256 must "
            f"be {init.sha256})"
        )
    actual = file_sha256(path)
    if actual != init.sha256:
        raise ModelInitError(
            f"model.init.sha256: {path} has sha256 {actual}, the spec says {init.sha256}; "
            "refusing other weights than the spec names (use the file the spec was written for, "
            "or update model.init.sha256 if you changed the weights on purpose)"
        )
    try:
        state = torch.load(path, weights_only=True)  # tensors only: a file cannot run code
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ModelInitError(
            f"model.init.file: {path} is not a torch state dict ({error})"
        ) from None
    expected = build_network(spec).state_dict()
    if not isinstance(state, dict) or set(state) != set(expected):
        names = sorted(set(state) ^ set(expected)) if isinstance(state, dict) else ["?"]
        raise ModelInitError(
            f"model.init.file: {path} does not hold this network's weights (names differ: "
            f"{', '.join(names[:4])}{' …' if len(names) > 4 else ''}); check model.channels, "
            "strides and num_res_units against the spec the weights were trained with"
        )
    wrong = [k for k, v in expected.items() if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise ModelInitError(
            f"model.init.file: {path}: {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, "
            f"this network's is {tuple(expected[wrong[0]].shape)}"
        )
    return state_to_numpy({k: v.to(expected[k].dtype) for k, v in state.items()})


def initial_weights(
    spec: ModelSpec, seed: int | None, *, model_store: Path | None = None
) -> dict[str, np.ndarray]:
    """The weights a job starts from, as numpy arrays: ``spec.init``'s file (from
    ``model_store``, checked against its sha256), else freshly initialised weights, identical
    for the same spec and seed.

    Raises:
        ModelInitError: the init file is missing, has another hash or does not fit the network.
    """
    if spec.init is not None:
        return _load_init(spec, model_store)
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


def trainable_names(network: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of ``network``'s parameters that match any of ``patterns`` (``fnmatch``)."""
    return [
        name
        for name, _ in network.named_parameters()
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
    ]


def unmatched_trainable_patterns(network: nn.Module, patterns: Sequence[str]) -> list[str]:
    """The patterns that match no parameter (a typo would otherwise freeze the whole network)."""
    names = [name for name, _ in network.named_parameters()]
    return [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]


def freeze_untrainable(network: nn.Module, patterns: Sequence[str]) -> int:
    """Set ``requires_grad`` False on every parameter no pattern matches; return the number of
    trainable scalars left (what DP noise is added to)."""
    chosen = set(trainable_names(network, patterns))
    count = 0
    for name, parameter in network.named_parameters():
        parameter.requires_grad_(name in chosen)
        count += parameter.numel() if name in chosen else 0
    return count
