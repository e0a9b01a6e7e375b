"""Baselines in one command: local-only, pooled, FedAvg and FedAvg + DP on the same simulated data.

**Same training budget** for every row: ``training.rounds`` x ``training.local_epochs`` epochs
(passes over the training patients), with the spec's batch size, optimizer, learning rate and
initial weights; every trainer keeps its optimizer state from round to round.

- local-only: each site alone, that many epochs over its own training patients (a one-site
  federation: the site's ``LocalJob``, no FLARE);
- pooled: one centralized model, that many epochs over the union of every site's training
  patients (no FLARE, no DP);
- FedAvg: ``rounds`` rounds of ``local_epochs`` epochs at every site (FLARE's simulator), DP off;
- FedAvg + DP: the same with DP-SGD (the spec's privacy section, or a target epsilon).

Every model is scored the same way on each site's held-out patients (the federation's split,
``site_app.evaluation``): the *final* model of each run, never one picked on those patients.
An optional sweep reruns FedAvg + DP at several target epsilons (``inf`` = DP off).

This module runs the rows; beside it: ``compare_specs`` (each row's spec variant, the sweep's
epsilon list, the shared budget), ``compare_results`` (the typed rows and ratios),
``compare_progress`` (the console progress), ``compare_render`` (tables, compare.md and
compare.json) and ``compare_plots`` (the privacy-utility plot).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from rich.console import Console

from jobs.messages import SiteResultMeta
from jobs.model import initial_weights
from jobs.spec import JobSpec
from server_app.history import RoundPhase, SiteRound
from server_app.report import write_report
from simulator.baselines import (
    SiteScore,
    SiteSplit,
    load_model,
    load_site_splits,
    score_model,
    train_local_only,
    train_pooled,
)
from simulator.compare_progress import RunProgress, row_summary
from simulator.compare_render import write_comparison
from simulator.compare_results import (
    COMPARE_FOLDER,
    LABELS,
    SWEEP_FOLDER,
    Comparison,
    Method,
    MethodResult,
    SweepPoint,
)
from simulator.compare_specs import (
    CompareError,
    privacy_text,
    privacy_variant,
    training_budget,
)
from simulator.federation import discover_sites, run_simulation, threads_per_site
from simulator.overlays import OverlayRefused, write_site_overlays
from site_app.training import use_cpu_threads

__all__ = ["run_compare"]

log = logging.getLogger(__name__)


def _run_key(spec: JobSpec) -> str:
    """Runs with equal keys give equal numbers (same spec and seed), whatever their name."""
    plain = spec.to_plain()
    plain.pop("name")
    return json.dumps(plain, sort_keys=True)


def _epsilon_folder(epsilon: float) -> str:
    return "eps_inf" if math.isinf(epsilon) else f"eps_{epsilon:g}"


# -- the runs --------------------------------------------------------------------------------


@dataclass
class _Context:
    spec: JobSpec
    data_dir: Path
    out_dir: Path
    sites: list[str]
    splits: dict[str, SiteSplit]
    threads: int | None
    num_threads: int
    """torch threads for the in-process rows (training and scoring)."""
    progress: RunProgress
    model_store: Path | None = None
    """Where ``model.init``'s file is (the spec's folder)."""
    models: dict[str, Callable[[str], torch.nn.Module]] = field(default_factory=dict)
    """Panel label -> model per site, for the slice overlays."""

    @property
    def cache_dir(self) -> Path:
        return self.out_dir / "cache"


def _score_all(ctx: _Context, model_for: Callable[[str], torch.nn.Module]) -> list[SiteScore]:
    return [score_model(ctx.spec, model_for(site), ctx.splits[site]) for site in ctx.sites]


def _run_public_only(ctx: _Context) -> MethodResult:
    """The weights the job starts from (``model.init``), scored untouched at every site."""
    spec = ctx.spec
    started = time.perf_counter()
    model = load_model(spec, initial_weights(spec.model, None, model_store=ctx.model_store))
    ctx.models[LABELS[Method.PUBLIC_ONLY]] = lambda site: model
    # Like every row, its model sits under the comparison's folder: the very file that was
    # checked against model.init's sha256 (init.json), not a re-serialisation of it.
    run_dir = ctx.out_dir / COMPARE_FOLDER / Method.PUBLIC_ONLY
    (run_dir / "models").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(
        Path(ctx.model_store) / spec.model.init.file, run_dir / "models" / spec.model.init.file
    )
    (run_dir / "init.json").write_text(json.dumps(spec.model.init.model_dump(), indent=2) + "\n")
    row = MethodResult(
        method=Method.PUBLIC_ONLY,
        label=LABELS[Method.PUBLIC_ONLY],
        scores=tuple(_score_all(ctx, lambda site: model)),
        steps=0,
        wall_s=time.perf_counter() - started,
        run_dir=str(run_dir.relative_to(ctx.out_dir)),
        privacy="none needed: trained on public data only",
    )
    ctx.progress.stop(row_summary(row))
    return row


def _run_local_only(ctx: _Context, *, dp_spec: JobSpec | None = None) -> MethodResult:
    """Each site alone, without DP, or with ``dp_spec``'s DP (each site spends its own)."""
    method = Method.LOCAL_ONLY if dp_spec is None else Method.LOCAL_ONLY_DP
    label = LABELS[method]
    spec = privacy_variant(ctx.spec, math.inf) if dp_spec is None else dp_spec
    run_dir = ctx.out_dir / COMPARE_FOLDER / method
    rounds = spec.training.rounds
    ctx.progress.start(label, total=len(ctx.sites) * rounds)
    steps = 0

    def on_round(site: str, round_index: int, meta: dict) -> None:
        nonlocal steps
        steps += int(SiteResultMeta.from_meta(meta).num_steps or 0)
        ctx.progress.advance(f"{label} {site} round {round_index + 1}/{rounds}")

    started = time.perf_counter()
    results = train_local_only(
        spec,
        data_dir=ctx.data_dir,
        sites=ctx.sites,
        cache_dir=ctx.cache_dir,
        state_dir=run_dir / "state",
        num_threads=ctx.num_threads,
        on_round=on_round,
        model_store=ctx.model_store,
    )
    wall_s = time.perf_counter() - started
    models = {site: load_model(spec, weights) for site, (weights, _) in results.items()}
    (run_dir / "models").mkdir(parents=True, exist_ok=True)
    for site, model in models.items():
        torch.save(model.state_dict(), run_dir / "models" / f"{site}.pt")
    ctx.models[label] = models.__getitem__
    scores = [
        replace(score, epsilon=results[score.site][1])
        for score in _score_all(ctx, models.__getitem__)
    ]
    row = MethodResult(
        method=method,
        label=label,
        scores=tuple(scores),
        steps=steps,
        wall_s=wall_s,
        run_dir=str(run_dir.relative_to(ctx.out_dir)),
        privacy=privacy_text(spec),
    )
    ctx.progress.stop(row_summary(row))
    return row


def _run_pooled(ctx: _Context) -> MethodResult:
    spec = privacy_variant(ctx.spec, math.inf)
    run_dir = ctx.out_dir / COMPARE_FOLDER / Method.POOLED
    rounds = spec.training.rounds
    ctx.progress.start("pooled", total=rounds)
    steps = 0

    def on_round(_: str, round_index: int, meta: dict) -> None:
        nonlocal steps
        steps += int(SiteResultMeta.from_meta(meta).num_steps or 0)
        ctx.progress.advance(f"pooled: {round_index + 1} x {spec.training.local_epochs} epochs")

    started = time.perf_counter()
    weights = train_pooled(
        spec,
        ctx.splits,
        num_threads=ctx.num_threads,
        on_round=on_round,
        model_store=ctx.model_store,
    )
    wall_s = time.perf_counter() - started
    model = load_model(spec, weights)
    (run_dir / "models").mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), run_dir / "models" / "pooled_model.pt")
    ctx.models[LABELS[Method.POOLED]] = lambda site: model
    row = MethodResult(
        method=Method.POOLED,
        label=LABELS[Method.POOLED],
        scores=tuple(_score_all(ctx, lambda site: model)),
        steps=steps,
        wall_s=wall_s,
        run_dir=str(run_dir.relative_to(ctx.out_dir)),
        privacy="none",
    )
    ctx.progress.stop(row_summary(row))
    return row


def _run_federated(
    ctx: _Context, spec: JobSpec, *, method: str, label: str, run_dir: Path
) -> MethodResult:
    rounds = spec.training.rounds
    ctx.progress.start(f"{label}: starting FLARE (about 20 s)", total=len(ctx.sites) * (rounds + 1))

    def on_record(record: SiteRound) -> None:
        stage = (
            "final validation" if record.phase == RoundPhase.FINAL else f"round {record.round + 1}"
        )
        ctx.progress.advance(f"{label}: {stage}/{rounds}, {record.site} reported")

    result = run_simulation(
        spec,
        data_dir=ctx.data_dir,
        out_dir=run_dir,
        threads=ctx.threads,
        on_record=on_record,
        cache_dir=ctx.cache_dir,
        model_store=ctx.model_store,
    )
    write_report(result.history, spec=spec.to_plain(), out_dir=run_dir, wall_s=result.wall_s)
    if result.history.stopped_reason:
        log.warning("%s stopped early: %s", label, result.history.stopped_reason)
    model = load_model(spec, run_dir / "models" / "final_model.pt")
    ctx.models.setdefault(label, lambda site: model)
    epsilon = result.history.last_epsilon()
    scores = [replace(s, epsilon=epsilon.get(s.site)) for s in _score_all(ctx, lambda _: model)]
    row = MethodResult(
        method=method,
        label=label,
        scores=tuple(scores),
        steps=sum(r.num_steps or 0 for r in result.history.rounds if not r.refused),
        wall_s=result.wall_s,
        run_dir=str(run_dir.relative_to(ctx.out_dir)),
        privacy=privacy_text(spec),
    )
    ctx.progress.stop(row_summary(row))
    return row


def run_compare(
    spec: JobSpec,
    *,
    data_dir: Path,
    out_dir: Path,
    dp_epsilon: float | None = None,
    epsilons: Sequence[float] = (),
    threads: int | None = None,
    console: Console | None = None,
    model_store: Path | None = None,
) -> Comparison:
    """Run the rows (and the sweep), write compare.json / compare.md / plots under ``out_dir``:
    the public model alone (when the spec starts from ``model.init``), local-only without and
    with DP, pooled, FedAvg and FedAvg + DP.

    Args:
        spec: the job; its privacy section drives the FedAvg + DP row unless ``dp_epsilon``.
        dp_epsilon: whole-job target epsilon for the FedAvg + DP row (per site).
        epsilons: sweep targets (``parse_epsilons``); each adds a FedAvg + DP run, except a
            target whose run is already in the table (same spec and seed, same numbers).
        threads: site processes at once in FLARE's simulator (default: one per site).
        console: where progress and summaries go; None = silent.
        model_store: where ``model.init``'s file is (the CLI passes the spec's folder).

    Raises:
        CompareError: the DP row has no privacy settings (DP off in the spec, no dp_epsilon).
        SimulationError: the data folder is missing or a federated run failed.
    """
    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir).resolve()
    if dp_epsilon is not None and not (dp_epsilon > 0):
        raise CompareError(f"--dp-epsilon: expected a number > 0, got {dp_epsilon}")
    dp_spec = privacy_variant(spec, dp_epsilon)
    if not dp_spec.privacy.enabled:
        raise CompareError(
            f"{spec.name}: privacy.enabled is false in the spec, so the FedAvg + DP row has no "
            "privacy settings; pass --dp-epsilon E (a whole-job target) or enable privacy"
        )
    sites = discover_sites(data_dir)
    for stale in (out_dir / COMPARE_FOLDER, out_dir / SWEEP_FOLDER):
        if stale.exists():
            shutil.rmtree(stale)  # a rerun must never mix with an earlier run's files
    # The thread count of one simulated site: local-only then gives a site's exact float
    # reductions, and torch never spins more threads than a share of the cores (on a shared
    # 2-core machine, validation took 39.5 s with 2 threads, 8.4 s with 1).
    num_threads = use_cpu_threads(threads_per_site(len(sites)))
    splits = load_site_splits(spec, data_dir=data_dir, sites=sites, cache_dir=out_dir / "cache")
    ctx = _Context(
        spec=spec,
        data_dir=data_dir,
        out_dir=out_dir,
        sites=sites,
        splits=splits,
        threads=threads,
        num_threads=num_threads,
        progress=RunProgress(console),
        model_store=model_store,
    )
    comparison = Comparison(
        job=spec.name, sites=sites, budget=training_budget(spec, splits), rows=[]
    )
    fedavg_spec = privacy_variant(spec, math.inf)
    if spec.model.init is not None:
        comparison.rows.append(_run_public_only(ctx))
    comparison.rows.append(_run_local_only(ctx))
    comparison.rows.append(_run_local_only(ctx, dp_spec=dp_spec))
    comparison.rows.append(_run_pooled(ctx))
    compare_dir = out_dir / COMPARE_FOLDER
    runs: dict[str, MethodResult] = {}
    for method, variant in ((Method.FEDAVG, fedavg_spec), (Method.FEDAVG_DP, dp_spec)):
        row = _run_federated(
            ctx, variant, method=method, label=LABELS[method], run_dir=compare_dir / method
        )
        comparison.rows.append(row)
        runs[_run_key(variant)] = row

    for epsilon in epsilons:
        variant = privacy_variant(spec, epsilon)
        key = _run_key(variant)
        if key not in runs:
            label = "FedAvg (DP off)" if math.isinf(epsilon) else f"FedAvg + DP, ε ≤ {epsilon:g}"
            runs[key] = _run_federated(
                ctx,
                variant,
                method=_epsilon_folder(epsilon),
                label=label,
                run_dir=out_dir / SWEEP_FOLDER / _epsilon_folder(epsilon),
            )
        comparison.sweep.append(SweepPoint(target_epsilon=epsilon, result=runs[key]))

    try:
        paths = write_site_overlays(
            data_dir=data_dir,
            val_patients={site: split.val for site, split in splits.items()},
            models={
                label: ctx.models[label]
                for label in (LABELS[m] for m in Method)
                if label in ctx.models
            },
            roi_size=spec.model.roi_size,
            spacing_mm=spec.data.target_spacing_mm,
            out_dir=compare_dir / "overlays",
        )
        comparison.overlays = [str(p.relative_to(out_dir)) for p in paths]
    except OverlayRefused as refusal:
        comparison.notes.append(str(refusal))
    write_comparison(comparison, out_dir)
    return comparison
