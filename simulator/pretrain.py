"""Pretraining on a public cohort: the weights a private federation starts from (``model.init``).

Public data costs no privacy, so the public model trains without DP, pooled, on the simulator's
public cohort (``generate_public_cohort``: other vendors, another HU calibration, larger and
brighter lesions than any site's). Run in *portable* arithmetic (``PORTABLE_ENVIRONMENT``: one
thread, no oneDNN, ATen's and numpy's baseline kernels, MKL's compatible code path), the same
command writes the same bytes on any x86-64 CPU, which is what lets weights ship in the
repository with a command and a test that regenerate them bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from jobs.model import build_network, file_sha256, initial_weights, numpy_to_state, state_to_numpy
from jobs.spec import JobSpec
from simulator.synthetic_data import generate_public_cohort
from site_app.dataset import PatientCropDataset, prepare_patients
from site_app.ingestion import ingest_site
from site_app.training import make_loss, scheduled_lr, train_epochs, use_cpu_threads

__all__ = [
    "PORTABLE_ENVIRONMENT",
    "PretrainResult",
    "PretrainSettings",
    "is_portable",
    "pretrain_public_model",
]

PORTABLE_ENVIRONMENT = {
    # ATen's scalar kernels (not AVX2 or AVX-512 ones, whose reductions add in another order).
    "ATEN_CPU_CAPABILITY": "default",
    # MKL's conditional numerical reproducibility: one code path on every CPU.
    "MKL_CBWR": "COMPATIBLE",
    # numpy's baseline (x86-64-v2) loops only.
    "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
"""Environment of a portable run; it must be set before numpy and torch are imported (the CLI
starts a fresh process with it). Measured on this project's 2-core AMD EPYC: a training step
1.65x slower than the default kernels."""


def is_portable(environ=os.environ) -> bool:
    return all(environ.get(name) == value for name, value in PORTABLE_ENVIRONMENT.items())


@dataclass(frozen=True)
class PretrainSettings:
    """How the public model is trained: pooled, no DP, Adam, cosine learning rate."""

    public_patients: int = 100
    """Patients in the public cohort (alternating between its two centres)."""
    public_seed: int = 0
    """Seed of the public cohort (its own generator streams: never a site's patients)."""
    epochs: int = 30
    batch_size: int = 16
    lr: float = 0.003
    seed: int = 0
    """Seeds the initial weights, the crops and the batch order."""


@dataclass(frozen=True)
class PretrainResult:
    path: Path
    sha256: str
    patients: int
    steps: int
    wall_s: float
    portable: bool


def _record(spec: JobSpec, settings: PretrainSettings, result: PretrainResult) -> dict:
    return {
        "weights": result.path.name,
        "sha256": result.sha256,
        "portable_arithmetic": result.portable,
        "model": spec.model.model_dump(mode="json", exclude={"init"}),
        "data": spec.data.model_dump(mode="json"),
        "settings": asdict(settings),
        "public_patients_used": result.patients,
        "steps": result.steps,
        "command": (
            "fedseg simulate pretrain SPEC --out WEIGHTS "
            f"--public-patients {settings.public_patients} --public-seed {settings.public_seed} "
            f"--epochs {settings.epochs} --batch-size {settings.batch_size} --lr {settings.lr:g} "
            f"--seed {settings.seed}"
        ),
    }


def pretrain_public_model(
    spec: JobSpec,
    *,
    out: Path,
    work_dir: Path,
    settings: PretrainSettings = PretrainSettings(),
    on_epoch: Callable[[int, int], None] | None = None,
) -> PretrainResult:
    """Write the public cohort to ``work_dir``, train ``spec``'s network on it without DP and
    save the state dict to ``out`` (plus ``out`` with ``.json``: how it was made and its sha256).

    Only ``spec.model`` (minus ``init``) and ``spec.data`` are used: the network and the same
    resampling and HU window the sites use.
    """
    if settings.public_patients < 2 or settings.epochs < 1 or settings.batch_size < 1:
        raise ValueError(
            "pretrain: public_patients must be >= 2, epochs and batch_size >= 1, got "
            f"{settings.public_patients}, {settings.epochs}, {settings.batch_size}"
        )
    portable = is_portable()
    if portable:
        torch.backends.mkldnn.enabled = False
    use_cpu_threads(1 if portable else None)
    started = time.perf_counter()
    cohort = Path(work_dir) / "public_cohort"
    generate_public_cohort(
        out_dir=cohort,
        patients=settings.public_patients,
        seed=settings.public_seed,
        workers=1 if portable else None,
    )
    ingested = ingest_site(cohort / "public", cache_dir=Path(work_dir) / "cache")
    patients = prepare_patients(ingested.patients, spec.data)
    model = spec.model.model_copy(update={"init": None})
    dataset = PatientCropDataset(
        patients,
        roi_size=model.roi_size,
        lesion_crop_fraction=spec.data.lesion_crop_fraction,
        seed=settings.seed,
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=min(settings.batch_size, len(dataset)),
        shuffle=True,
        generator=torch.Generator().manual_seed(settings.seed),
    )
    network = build_network(model)
    network.load_state_dict(numpy_to_state(initial_weights(model, settings.seed)))
    optimizer = torch.optim.Adam(network.parameters(), lr=settings.lr)
    loss_fn = make_loss()
    steps = 0
    for epoch in range(settings.epochs):
        lr = scheduled_lr(settings.lr, "cosine", epoch=epoch, total_epochs=settings.epochs)
        stats = train_epochs(
            network, optimizer, loader, epochs=1, loss_fn=loss_fn, lr_per_epoch=[lr]
        )
        steps += stats.steps
        if on_epoch:
            on_epoch(epoch + 1, settings.epochs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Contiguous float32 tensors in a fixed key order: the file's bytes depend on the values only.
    state = {
        k: torch.from_numpy(np.ascontiguousarray(v))
        for k, v in state_to_numpy(network.state_dict()).items()
    }
    torch.save(state, out)
    result = PretrainResult(
        path=out,
        sha256=file_sha256(out),
        patients=len(patients),
        steps=steps,
        wall_s=time.perf_counter() - started,
        portable=portable,
    )
    out.with_suffix(out.suffix + ".json").write_text(
        json.dumps(_record(spec, settings, result), indent=2) + "\n"
    )
    if not math.isfinite(float(sum(float(v.abs().sum()) for v in state.values()))):
        raise RuntimeError("pretrain: the weights are not finite; lower --lr")
    return result
