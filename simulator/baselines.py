"""Baselines without FLARE: each site alone (local-only) and every site's data pooled (centralized).

Both reuse the site's own code (ingestion, patient split, crop dataset, training loop, LocalJob)
and the federation's split, so their numbers compare directly with FedAvg's. Simulation only:
pooling patients from several hospitals is exactly what a federation avoids.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from jobs.messages import SiteResultMeta
from jobs.model import (
    build_network,
    freeze_untrainable,
    initial_weights,
    numpy_to_state,
    state_to_numpy,
)
from jobs.seeds import derived_seed
from jobs.spec import JobSpec
from site_app.dataset import PatientCropDataset, PreparedPatient, prepare_patients, split_patients
from site_app.evaluation import evaluate_patients, summarize
from site_app.ingestion import ingest_site
from site_app.local_job import LocalJob
from site_app.policy import PrivacyPolicy
from site_app.site_config import SiteConfig
from site_app.training import (
    make_loss,
    make_optimizer,
    round_learning_rates,
    train_epochs,
    use_cpu_threads,
)

__all__ = [
    "SiteScore",
    "SiteSplit",
    "load_model",
    "load_site_splits",
    "score_model",
    "train_local_only",
    "train_pooled",
]

Weights = dict[str, np.ndarray]
RoundCallback = Callable[[str, int, dict], None]
"""Called with (site or "pooled", 0-based round, metadata as a site sends it:
``jobs.messages.SiteResultMeta.to_meta()``) after each round of training."""


@dataclass(frozen=True)
class SiteSplit:
    """One site's patients, split exactly as ``LocalJob`` splits them in the federation."""

    site: str
    train: tuple[PreparedPatient, ...]
    val: tuple[PreparedPatient, ...]


@dataclass(frozen=True)
class SiteScore:
    """A model's metrics on one site's held-out patients (``site_app.evaluation`` definitions).

    ``dice``: mean over held-out volumes with a lesion; ``hd95_mm``: mean HD95 (mm) over those
    where it is defined; ``hd95_missing``: lesion volumes with an empty prediction (Dice 0, HD95
    undefined); ``epsilon``: what the site spent for the model (None without DP).
    """

    site: str
    dice: float | None
    hd95_mm: float | None
    hd95_missing: int
    lesion_volumes: int
    val_patients: int
    epsilon: float | None = None


def _seed(seed: int | None, purpose: str) -> int:
    """A per-purpose seed derived from the spec's seed; fresh randomness when it is null."""
    if seed is None:
        return secrets.randbits(63)
    return derived_seed(seed, "pooled", purpose)


def _site_config(
    data_dir: Path, site: str, cache_dir: Path, num_threads: int, state_dir: Path
) -> SiteConfig:
    # Baselines are the researcher's own comparison on simulated data: DP is not required, and
    # each site alone keeps its own ledger (a local-only run with DP is a job of its own).
    return SiteConfig.model_validate(
        {
            "data_dir": data_dir / site,
            "cache_dir": cache_dir / site,
            "num_threads": num_threads,
            "ledger": state_dir / "epsilon_ledger.jsonl",
            "signing_key": state_dir / "site_key.pem",
            "policy": PrivacyPolicy.for_simulated_data(),
        }
    )


def load_site_splits(
    spec: JobSpec, *, data_dir: Path, sites: Sequence[str], cache_dir: Path
) -> dict[str, SiteSplit]:
    """Every site's (train, val) patients: same ingestion, preparation and split as LocalJob."""
    splits = {}
    for site in sites:
        ingested = ingest_site(data_dir / site, cache_dir=cache_dir / site)
        patients = prepare_patients(ingested.patients, spec.data)
        train, val = split_patients(
            patients, val_fraction=spec.data.val_fraction, seed=spec.training.seed
        )
        splits[site] = SiteSplit(site=site, train=train, val=val)
    return splits


def train_local_only(
    spec: JobSpec,
    *,
    data_dir: Path,
    sites: Sequence[str],
    cache_dir: Path,
    state_dir: Path,
    num_threads: int | None = None,
    on_round: RoundCallback | None = None,
    model_store: Path | None = None,
) -> dict[str, tuple[Weights, float | None]]:
    """Each site trains alone: ``rounds`` x ``local_epochs`` epochs on its own training patients.

    Exactly a one-site federation: the site's ``LocalJob`` runs ``train_round`` on its own
    weights every round (its optimizer state carries over, as at a federated site), from the
    federation's initial weights (``model_store``: where ``model.init``'s file is). With DP in
    ``spec`` each site spends its own epsilon, as it would in the federation. ``state_dir`` is
    wiped first. Returns each site's final weights and epsilon (None without DP).
    """
    threads = num_threads or os.cpu_count() or 1
    final = {}
    for site in sites:
        site_state = state_dir / site
        _wipe(site_state)  # a leftover dp_state.pt would resume instead of starting fresh
        job = LocalJob(
            spec=spec,
            site=site,
            config=_site_config(data_dir, site, cache_dir, threads, site_state),
            state_dir=site_state / "job",
            simulation=True,
            job_id=f"{spec.name}-local-only-{site}",
        )
        weights = initial_weights(spec.model, spec.training.seed, model_store=model_store)
        for round_index in range(spec.training.rounds):
            weights, meta = job.train_round(weights, round_index)
            if on_round:
                on_round(site, round_index, meta)
        final[site] = (weights, job.epsilon())
    return final


def train_pooled(
    spec: JobSpec,
    splits: dict[str, SiteSplit],
    *,
    num_threads: int | None = None,
    on_round: RoundCallback | None = None,
    model_store: Path | None = None,
) -> Weights:
    """Centralized training on the union of every site's training patients (no DP).

    Same budget as the federation in epochs: ``rounds`` x ``local_epochs`` passes over the
    pooled patients with the same batch size, optimizer, learning rate, initial weights and
    trainable parameters (one optimizer throughout, as each federated site keeps its own across
    rounds), so the only difference to FedAvg is where the data sits.
    """
    training = spec.training
    use_cpu_threads(num_threads)
    patients = tuple(patient for split in splits.values() for patient in split.train)
    if not patients:
        raise ValueError("train_pooled: no training patients at any site")
    dataset = PatientCropDataset(
        patients,
        roi_size=spec.model.roi_size,
        lesion_crop_fraction=spec.data.lesion_crop_fraction,
        seed=_seed(training.seed, "crops"),
        crops_per_patient=training.crops_per_patient,
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=min(training.batch_size, len(dataset)),
        shuffle=True,
        generator=torch.Generator().manual_seed(_seed(training.seed, "sampler")),
    )
    network = build_network(spec.model)
    start = initial_weights(spec.model, training.seed, model_store=model_store)
    network.load_state_dict(numpy_to_state(start))
    freeze_untrainable(network, training.trainable)  # the same parameters train as at a site
    optimizer = make_optimizer(training, [p for p in network.parameters() if p.requires_grad])
    loss_fn = make_loss()
    for round_index in range(training.rounds):
        stats = train_epochs(
            network,
            optimizer,
            loader,
            epochs=training.local_epochs,
            loss_fn=loss_fn,
            lr_per_epoch=round_learning_rates(training, round_index),
        )
        if on_round:
            meta = SiteResultMeta(num_steps=stats.steps, train_loss=stats.mean_loss).to_meta()
            on_round("pooled", round_index, meta)
    return state_to_numpy(network.state_dict())


def load_model(spec: JobSpec, weights: Weights | Path) -> nn.Module:
    """The spec's network with ``weights`` (numpy arrays, or a saved ``.pt`` state dict)."""
    network = build_network(spec.model)
    if isinstance(weights, Path):
        state = torch.load(weights, weights_only=True)
    else:
        state = numpy_to_state(weights)
    network.load_state_dict(state)
    return network.eval()


def score_model(spec: JobSpec, model: nn.Module, split: SiteSplit) -> SiteScore:
    """Dice and HD95 of ``model`` on ``split.val``, the way sites validate in the federation."""
    metrics = summarize(
        evaluate_patients(
            model,
            split.val,
            roi_size=spec.model.roi_size,
            spacing_mm=spec.data.target_spacing_mm,
        )
    )
    return SiteScore(
        site=split.site,
        dice=metrics.val_dice,
        hd95_mm=metrics.val_hd95_mm,
        hd95_missing=metrics.val_hd95_missing,
        lesion_volumes=metrics.val_lesion_volumes,
        val_patients=metrics.val_patients,
    )


def _wipe(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
