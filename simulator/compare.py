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
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless

import matplotlib.pyplot as plt  # after use("Agg"): the backend must be chosen first
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from jobs import keys
from jobs.model import initial_weights
from jobs.spec import JobSpec, parse_spec
from server_app.history import RunHistory, SiteRound
from server_app.report import write_report
from server_app.report_build import WEAK_EPSILON
from simulator.baselines import (
    SiteScore,
    SiteSplit,
    load_model,
    load_site_splits,
    score_model,
    train_local_only,
    train_pooled,
)
from simulator.federation import discover_sites, run_simulation, threads_per_site
from simulator.overlays import OverlayRefused, write_site_overlays

__all__ = [
    "CompareError",
    "Comparison",
    "Method",
    "MethodResult",
    "SweepPoint",
    "comparison_ratios",
    "comparison_table",
    "parse_epsilons",
    "privacy_variant",
    "ratio_lines",
    "run_compare",
    "sweep_table",
]

log = logging.getLogger(__name__)

COMPARE_FOLDER = "compare"
SWEEP_FOLDER = "sweep"
PRIVACY_UTILITY_PLOT = "privacy_utility.png"


class CompareError(ValueError):
    """A comparison that cannot run as asked; the message names the option and the fix."""


class Method(StrEnum):
    PUBLIC_ONLY = "public_only"
    LOCAL_ONLY = "local_only"
    LOCAL_ONLY_DP = "local_only_dp"
    POOLED = "pooled"
    FEDAVG = "fedavg"
    FEDAVG_DP = "fedavg_dp"


LABELS = {
    Method.PUBLIC_ONLY: "public model only",
    Method.LOCAL_ONLY: "local-only",
    Method.LOCAL_ONLY_DP: "local-only + DP",
    Method.POOLED: "pooled",
    Method.FEDAVG: "FedAvg",
    Method.FEDAVG_DP: "FedAvg + DP",
}


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None and math.isfinite(v)]
    return sum(present) / len(present) if present else None


@dataclass(frozen=True)
class MethodResult:
    """One row: a method's final model(s) scored at every site."""

    method: str
    label: str
    scores: tuple[SiteScore, ...]
    steps: int
    """Optimizer steps taken, summed over sites (the compute the budget bought)."""
    wall_s: float
    run_dir: str
    """Where the run's files are, relative to the comparison's output folder."""
    privacy: str
    """Plain-language privacy of the run: "none" or the DP settings."""

    @property
    def mean_dice(self) -> float | None:
        """Unweighted mean over sites of each site's Dice (sites without a score left out)."""
        return _mean([s.dice for s in self.scores])

    @property
    def mean_hd95_mm(self) -> float | None:
        return _mean([s.hd95_mm for s in self.scores])

    @property
    def max_epsilon(self) -> float | None:
        values = [s.epsilon for s in self.scores if s.epsilon is not None]
        return max(values) if values else None

    def to_json(self) -> dict:
        return {
            **asdict(self),
            "mean_dice": self.mean_dice,
            "mean_hd95_mm": self.mean_hd95_mm,
            "max_epsilon": self.max_epsilon,
        }


@dataclass(frozen=True)
class SweepPoint:
    target_epsilon: float
    """Whole-job epsilon each site may spend; inf = DP off."""
    result: MethodResult


@dataclass
class Comparison:
    job: str
    sites: list[str]
    budget: dict
    rows: list[MethodResult]
    sweep: list[SweepPoint] = field(default_factory=list)
    overlays: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(self, method: Method) -> MethodResult | None:
        return next((row for row in self.rows if row.method == method), None)

    def to_json(self) -> dict:
        return {
            "job": self.job,
            "sites": self.sites,
            "budget": self.budget,
            "rows": [row.to_json() for row in self.rows],
            "ratios": comparison_ratios(self.rows),
            "sweep": [
                {"target_epsilon": _json_epsilon(p.target_epsilon), **p.result.to_json()}
                for p in self.sweep
            ],
            "overlays": self.overlays,
            "notes": self.notes,
        }


def _json_epsilon(value: float) -> float | str:
    return "inf" if math.isinf(value) else value


# -- pure helpers ----------------------------------------------------------------------------


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def comparison_ratios(rows: Sequence[MethodResult]) -> dict[str, float | None]:
    """Mean-Dice ratios FedAvg / pooled and (FedAvg + DP) / FedAvg, and FedAvg - local-only.

    None where a row is missing or the denominator's mean Dice is 0 or unknown.
    """
    dice = {row.method: row.mean_dice for row in rows}
    fedavg, local = dice.get(Method.FEDAVG), dice.get(Method.LOCAL_ONLY)
    dp, public = dice.get(Method.FEDAVG_DP), dice.get(Method.PUBLIC_ONLY)
    local_dp = dice.get(Method.LOCAL_ONLY_DP)
    return {
        "fedavg_over_pooled": _ratio(fedavg, dice.get(Method.POOLED)),
        "dp_over_fedavg": _ratio(dp, fedavg),
        "fedavg_minus_local_only": None if fedavg is None or local is None else fedavg - local,
        "dp_minus_public_only": None if dp is None or public is None else dp - public,
        "dp_minus_local_only_dp": None if dp is None or local_dp is None else dp - local_dp,
    }


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


def _privacy_text(spec: JobSpec) -> str:
    privacy = spec.privacy
    if not privacy.enabled:
        return "none"
    noise = (
        f"target epsilon {privacy.target_epsilon:g} (whole job)"
        if privacy.target_epsilon is not None
        else f"noise multiplier {privacy.noise_multiplier:g}"
    )
    return f"DP-SGD per patient, {noise}, delta {privacy.delta:g}, {privacy.accountant.value}"


def _run_key(spec: JobSpec) -> str:
    """Runs with equal keys give equal numbers (same spec and seed), whatever their name."""
    plain = spec.to_plain()
    plain.pop("name")
    return json.dumps(plain, sort_keys=True)


def _epsilon_folder(epsilon: float) -> str:
    return "eps_inf" if math.isinf(epsilon) else f"eps_{epsilon:g}"


def training_budget(spec: JobSpec, splits: dict[str, SiteSplit]) -> dict:
    """The shared budget, with the patient counts it applies to (plain data)."""
    training = spec.training
    return {
        "epochs": training.rounds * training.local_epochs,
        "rounds": training.rounds,
        "local_epochs": training.local_epochs,
        "batch_size": training.batch_size,
        "optimizer": training.optimizer.value,
        "lr": training.lr,
        "lr_schedule": training.lr_schedule.value,
        "train_patients": {site: len(split.train) for site, split in splits.items()},
        "val_patients": {site: len(split.val) for site, split in splits.items()},
        "definition": (
            "every row trains rounds x local_epochs epochs with the same batch size, optimizer, "
            "learning rate schedule and initial weights (each trainer keeps its optimizer state "
            "across rounds): local-only over each site's own training patients, pooled over the "
            "union of all sites' training patients, FedAvg and FedAvg + DP at every site per round"
        ),
    }


# -- progress --------------------------------------------------------------------------------


class _Progress:
    """One rich progress bar per run, plus a summary line when it ends (silent without console)."""

    def __init__(self, console: Console | None) -> None:
        self.console = console
        self._bar: Progress | None = None
        self._task = None

    def start(self, description: str, total: int) -> None:
        if self.console is None:
            return
        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self._bar.start()
        self._task = self._bar.add_task(description, total=total)

    def advance(self, description: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=description)

    def stop(self, summary: str) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self.console is not None:
            self.console.print(summary)


def _summary(row: MethodResult) -> str:
    dice = "-" if row.mean_dice is None else f"{row.mean_dice:.3f}"
    hd95 = "-" if row.mean_hd95_mm is None else f"{row.mean_hd95_mm:.1f} mm"
    epsilon = "" if row.max_epsilon is None else f", epsilon up to {row.max_epsilon:.2f}"
    return (
        f"[green]done[/green] {row.label}: mean Dice {dice}, HD95 {hd95}{epsilon} "
        f"({row.steps} steps, {row.wall_s:.0f} s) -> {row.run_dir}"
    )


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
    progress: _Progress
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
    ctx.progress.stop(_summary(row))
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
        steps += int(meta.get(keys.NUM_STEPS) or 0)
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
        privacy=_privacy_text(spec),
    )
    ctx.progress.stop(_summary(row))
    return row


def _run_pooled(ctx: _Context) -> MethodResult:
    spec = privacy_variant(ctx.spec, math.inf)
    run_dir = ctx.out_dir / COMPARE_FOLDER / Method.POOLED
    rounds = spec.training.rounds
    ctx.progress.start("pooled", total=rounds)
    steps = 0

    def on_round(_: str, round_index: int, meta: dict) -> None:
        nonlocal steps
        steps += int(meta.get(keys.NUM_STEPS) or 0)
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
    ctx.progress.stop(_summary(row))
    return row


def _last_epsilon(history: RunHistory) -> dict[str, float]:
    epsilon = {}
    for record in sorted(history.rounds, key=lambda r: r.round):
        if record.epsilon is not None:
            epsilon[record.site] = record.epsilon
    return epsilon


def _run_federated(
    ctx: _Context, spec: JobSpec, *, method: str, label: str, run_dir: Path
) -> MethodResult:
    rounds = spec.training.rounds
    ctx.progress.start(f"{label}: starting FLARE (about 20 s)", total=len(ctx.sites) * (rounds + 1))

    def on_record(record: SiteRound) -> None:
        stage = "final validation" if record.phase == "final" else f"round {record.round + 1}"
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
    epsilon = _last_epsilon(result.history)
    scores = [replace(s, epsilon=epsilon.get(s.site)) for s in _score_all(ctx, lambda _: model)]
    row = MethodResult(
        method=method,
        label=label,
        scores=tuple(scores),
        steps=sum(r.num_steps or 0 for r in result.history.rounds if not r.refused),
        wall_s=result.wall_s,
        run_dir=str(run_dir.relative_to(ctx.out_dir)),
        privacy=_privacy_text(spec),
    )
    ctx.progress.stop(_summary(row))
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
    num_threads = threads_per_site(len(sites))
    torch.set_num_threads(num_threads)
    splits = load_site_splits(spec, data_dir=data_dir, sites=sites, cache_dir=out_dir / "cache")
    ctx = _Context(
        spec=spec,
        data_dir=data_dir,
        out_dir=out_dir,
        sites=sites,
        splits=splits,
        threads=threads,
        num_threads=num_threads,
        progress=_Progress(console),
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


# -- outputs ---------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _hd95_cell(score: SiteScore) -> str:
    text = _num(score.hd95_mm, 1)
    return f"{text} ({score.hd95_missing} empty)" if score.hd95_missing else text


def _table_rows(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    header = ["method"]
    for site in comparison.sites:
        header += [f"{site} Dice", f"{site} HD95 mm"]
    header += ["mean Dice", "mean HD95 mm", "epsilon per site", "steps", "wall s"]
    rows = []
    for row in comparison.rows:
        by_site = {s.site: s for s in row.scores}
        cells = [row.label]
        for site in comparison.sites:
            cells += [_num(by_site[site].dice), _hd95_cell(by_site[site])]
        epsilons = [s.epsilon for s in row.scores]
        cells += [
            _num(row.mean_dice),
            _num(row.mean_hd95_mm, 1),
            "-" if row.max_epsilon is None else " / ".join(_num(e, 2) for e in epsilons),
            str(row.steps),
            f"{row.wall_s:.0f}",
        ]
        rows.append(cells)
    return header, rows


def ratio_lines(comparison: Comparison) -> list[str]:
    """The ratios and the FedAvg vs local-only verdict, one plain line each."""
    ratios = comparison_ratios(comparison.rows)
    dp = comparison.row(Method.FEDAVG_DP)
    dp_eps = "" if dp is None or dp.max_epsilon is None else f" (epsilon ≤ {dp.max_epsilon:.2f})"
    lines = [
        f"FedAvg / pooled mean Dice: {_num(ratios['fedavg_over_pooled'])} (goal ≥ 0.95)",
        f"FedAvg + DP / FedAvg mean Dice: {_num(ratios['dp_over_fedavg'])}{dp_eps} "
        "(goal ≥ 0.93 at epsilon ≤ 8 per site)",
    ]
    difference = ratios["fedavg_minus_local_only"]
    if difference is not None:
        verdict = "above" if difference > 0 else "not above"
        lines.append(f"FedAvg mean Dice is {verdict} the local-only mean ({difference:+.3f})")
    gain = ratios["dp_minus_public_only"]
    if gain is not None:
        verdict = "above" if gain > 0 else "NOT above"
        lines.append(
            f"FedAvg + DP mean Dice is {verdict} the public model alone ({gain:+.3f}): what the "
            "private federation added to pretraining"
        )
    local_dp = comparison.row(Method.LOCAL_ONLY_DP)
    if dp is not None and local_dp is not None:
        ahead = {s.site: s.dice for s in dp.scores}
        behind = [
            s.site
            for s in local_dp.scores
            if s.dice is not None and (ahead.get(s.site) or 0.0) <= s.dice
        ]
        lines.append(
            "FedAvg + DP beats each site alone with the same DP at every site"
            if not behind
            else f"FedAvg + DP does not beat local-only + DP at {', '.join(behind)}"
        )
    return lines


def _sweep_rows(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    header = ["target epsilon", "epsilon spent (max site)", "mean Dice", "mean HD95 mm", "run"]
    rows = [
        [
            "inf (DP off)" if math.isinf(p.target_epsilon) else f"{p.target_epsilon:g}",
            _num(p.result.max_epsilon, 2),
            _num(p.result.mean_dice),
            _num(p.result.mean_hd95_mm, 1),
            p.result.run_dir,
        ]
        for p in comparison.sweep
    ]
    return header, rows


def comparison_table(comparison: Comparison) -> Table:
    """The table for a terminal: per site "Dice | HD95", then means, epsilon (max over sites)."""
    table = Table(title=f"Baselines, same training budget — {escape(comparison.job)}")
    table.add_column("method", no_wrap=True)
    for site in comparison.sites:
        table.add_column(f"{site}\nDice | HD95 mm", justify="right", no_wrap=True)
    for column in ("mean\nDice", "mean\nHD95 mm", "epsilon\n(max)", "steps", "wall s"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in comparison.rows:
        by_site = {s.site: s for s in row.scores}
        table.add_row(
            escape(row.label),
            *(f"{_num(by_site[s].dice)} | {_hd95_cell(by_site[s])}" for s in comparison.sites),
            _num(row.mean_dice),
            _num(row.mean_hd95_mm, 1),
            _num(row.max_epsilon, 2),
            str(row.steps),
            f"{row.wall_s:.0f}",
        )
    return table


def sweep_table(comparison: Comparison) -> Table:
    header, rows = _sweep_rows(comparison)
    table = Table(title=f"Privacy–utility sweep — {escape(comparison.job)}")
    for column in header:
        table.add_column(column, justify="left" if column == "run" else "right")
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))
    return table


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _markdown(comparison: Comparison) -> str:
    budget = comparison.budget
    parts = [
        f"# fedseg baselines: {comparison.job}",
        "",
        f"- sites: {', '.join(comparison.sites)}; training patients "
        + ", ".join(f"{s} {n}" for s, n in budget["train_patients"].items())
        + "; held-out "
        + ", ".join(f"{s} {n}" for s, n in budget["val_patients"].items()),
        f"- budget: {budget['epochs']} epochs = {budget['rounds']} rounds x "
        f"{budget['local_epochs']} local epochs, batch {budget['batch_size']}, "
        f"{budget['optimizer']} lr {budget['lr']:g} ({budget['lr_schedule']}); "
        f"{budget['definition']}",
        "- scores: final model of each run on each site's held-out patients (the federation's "
        "split); Dice over lesion volumes, HD95 (mm) over those with a non-empty prediction "
        '("n empty": lesion volumes predicted empty, Dice 0, HD95 undefined); means are '
        "unweighted over sites",
        "- privacy of the DP row: "
        + next((r.privacy for r in comparison.rows if r.method == Method.FEDAVG_DP), "-")
        + "; epsilon covers the model updates only, not the reported metrics",
    ]
    dp = comparison.row(Method.FEDAVG_DP)
    if dp is not None and dp.max_epsilon is not None and dp.max_epsilon > WEAK_EPSILON:
        parts.append(
            f"- **weak privacy**: epsilon up to {dp.max_epsilon:.1f} (> {WEAK_EPSILON:g}) gives "
            "little formal protection"
        )
    header, rows = _table_rows(comparison)
    parts += ["", _markdown_table(header, rows), ""]
    parts += [f"- {line}" for line in ratio_lines(comparison)]
    if comparison.sweep:
        header, rows = _sweep_rows(comparison)
        parts += [
            "",
            "## Privacy–utility sweep",
            "",
            "FedAvg + DP with `privacy.target_epsilon` = each target for the whole job (each "
            "site's noise is derived from it and its own patient count); inf = DP off. A "
            "target whose run is already above is not run twice (same spec and seed).",
            "",
            _markdown_table(header, rows),
            "",
            f"![privacy-utility](../{SWEEP_FOLDER}/{PRIVACY_UTILITY_PLOT})",
        ]
    if comparison.overlays:
        parts += ["", "## Slice overlays (synthetic data)", ""]
        parts += [f"![{Path(p).stem}](../{p})" for p in comparison.overlays]
    if comparison.notes:
        parts += ["", "## Notes", ""] + [f"- {note}" for note in comparison.notes]
    return "\n".join(parts) + "\n"


def plot_privacy_utility(sweep: Sequence[SweepPoint], path: Path) -> Path | None:
    """Mean Dice (and each site's) against the target epsilon; DP off as a dashed line."""
    finite = [p for p in sweep if not math.isinf(p.target_epsilon)]
    off = [p for p in sweep if math.isinf(p.target_epsilon)]
    if not sweep:
        return None
    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    if finite:
        xs = [p.target_epsilon for p in finite]
        axes.plot(xs, [p.result.mean_dice or 0.0 for p in finite], marker="o", label="mean")
        sites = sorted({s.site for p in finite for s in p.result.scores})
        for site in sites:
            ys = [next(s.dice for s in p.result.scores if s.site == site) for p in finite]
            axes.scatter(xs, [y if y is not None else 0.0 for y in ys], s=14, alpha=0.6, label=site)
        axes.set_xscale("log")
        axes.set_xticks(xs, [f"{x:g}" for x in xs])
        axes.minorticks_off()
    for point in off:
        axes.axhline(
            point.result.mean_dice or 0.0, linestyle="--", color="grey", label="DP off (ε = ∞)"
        )
    axes.set_xlabel("target epsilon per site, whole job (log scale)")
    axes.set_ylabel("Dice, final global model (held-out)")
    axes.set_ylim(bottom=0)
    axes.set_title("Privacy–utility: FedAvg + DP")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def write_comparison(comparison: Comparison, out_dir: Path) -> None:
    """compare.json and compare.md in ``<out>/compare/``; the sweep plot in ``<out>/sweep/``."""
    compare_dir = Path(out_dir) / COMPARE_FOLDER
    compare_dir.mkdir(parents=True, exist_ok=True)
    if comparison.sweep:
        plot_privacy_utility(comparison.sweep, Path(out_dir) / SWEEP_FOLDER / PRIVACY_UTILITY_PLOT)
    (compare_dir / "compare.json").write_text(json.dumps(comparison.to_json(), indent=2))
    (compare_dir / "compare.md").write_text(_markdown(comparison))
