"""Weights on the wire: one flat array per message instead of one per tensor, optionally float16.

FLARE 2.9 sends each numpy array of a message as its own ``.npz`` item (about 260 bytes of
zip and ``.npy`` headers per tensor, measured in benchmarks/round_bytes.py), so a 37-tensor
UNet pays ~10 KB per message on top of its weights. Both sides build the same network from the
JobSpec, so names and shapes need not travel: the sender concatenates every floating tensor in
sorted-name order into one array, the receiver splits it by the layout it derives itself. The
array's key carries a fingerprint of that layout, so a mismatch is an error, never a silent
misassignment. A site may send float16 (``federation.transfer_dtype``); the receiver restores
the network's own dtype (float32), and the server averages in float64 (``fed_avg``).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np

from jobs.spec import ModelSpec, TransferDtype

__all__ = ["PACKED_PREFIX", "WeightLayout", "pack_weights", "unpack_weights", "weight_layout"]

PACKED_PREFIX = "fedseg.packed."
"""Key of the packed array: this prefix + the layout's fingerprint (both sides import it)."""

_FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class WeightLayout:
    """Name, shape and dtype of every tensor of a network's state dict, sorted by name."""

    entries: tuple[tuple[str, tuple[int, ...], str], ...]

    @property
    def fingerprint(self) -> str:
        text = ";".join(f"{name}:{list(shape)}:{dtype}" for name, shape, dtype in self.entries)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def key(self) -> str:
        return PACKED_PREFIX + self.fingerprint

    @property
    def packed(self) -> tuple[tuple[str, tuple[int, ...], str], ...]:
        """The entries that travel in the packed array (floating point ones)."""
        return tuple(e for e in self.entries if np.issubdtype(np.dtype(e[2]), np.floating))

    @classmethod
    def of(cls, weights: dict[str, np.ndarray]) -> WeightLayout:
        return cls(
            tuple(
                (name, tuple(np.shape(weights[name])), np.asarray(weights[name]).dtype.str)
                for name in sorted(weights)
            )
        )


@functools.lru_cache(maxsize=8)
def weight_layout(model: ModelSpec) -> WeightLayout:
    """The layout of the network ``model`` describes (built once per process, then cached)."""
    from jobs.model import build_network, state_to_numpy

    return WeightLayout.of(state_to_numpy(build_network(model).state_dict()))


def pack_weights(
    weights: dict[str, np.ndarray], dtype: TransferDtype = TransferDtype.FLOAT32
) -> dict[str, np.ndarray]:
    """``{layout key: 1-D array of every floating tensor, sorted by name, cast to dtype}``.

    Non-floating tensors (none in fedseg's networks) travel unchanged under their own names.

    Raises:
        ValueError: float16 was asked for and a weight is beyond float16's range (it would
            arrive as infinity); the message names the tensor.
    """
    if not weights:
        return {}  # nothing to send (e.g. a refused round)
    layout = WeightLayout.of(weights)
    target = np.dtype(TransferDtype(dtype).value)
    parts = []
    for name, _, _ in layout.packed:
        value = np.asarray(weights[name])
        if target == np.float16:
            largest = float(np.max(np.abs(value), initial=0.0))
            if largest > _FLOAT16_MAX:
                raise ValueError(
                    f"weight {name} reaches {largest:.3g}, beyond float16's range "
                    f"({_FLOAT16_MAX:g}); set federation.transfer_dtype: float32 in the job spec"
                )
        parts.append(value.astype(target, copy=False).ravel())
    packed = {layout.key: np.concatenate(parts) if parts else np.zeros(0, target)}
    in_flat = {name for name, *_ in layout.packed}
    for name, *_ in layout.entries:
        if name not in in_flat:
            packed[name] = np.asarray(weights[name])
    return packed


def unpack_weights(params: dict, layout: WeightLayout) -> dict[str, np.ndarray]:
    """The named tensors of a packed message, in ``layout``'s dtypes; other dicts unchanged.

    Raises:
        ValueError: the message was packed for another network (different fingerprint or
            size); the message says what to check.
    """
    packed_keys = [key for key in params if str(key).startswith(PACKED_PREFIX)]
    if not packed_keys:
        return params  # plain named weights (or none, e.g. a refusal)
    if packed_keys != [layout.key]:
        raise ValueError(
            f"received weights packed for another network (layout {packed_keys[0]}, this job's "
            f"network is {layout.key}); every site and the server must run the same job spec"
        )
    flat = np.asarray(params[layout.key])
    expected = sum(int(np.prod(shape)) for _, shape, _ in layout.packed)
    if flat.ndim != 1 or flat.size != expected:
        raise ValueError(
            f"received {flat.size} packed weight values, the job's network has {expected}; "
            "every site and the server must run the same job spec"
        )
    weights: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape, dtype in layout.packed:
        size = int(np.prod(shape))
        weights[name] = flat[offset : offset + size].astype(np.dtype(dtype)).reshape(shape)
        offset += size
    for name, *_ in layout.entries:
        if name not in weights:
            weights[name] = np.asarray(params[name])
    return weights
