"""``fedseg simulate``: synthetic sites, a simulated federation, and the baselines compare."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from rich.markup import escape

from fedseg.terminal import UserError, console, int_at_least, print_table

if TYPE_CHECKING:
    from server_app.history import SiteRound


def _simulate_data(args: argparse.Namespace) -> None:
    from simulator.synthetic_data import generate_federation_data, generate_public_cohort

    if args.public:
        if args.sites is not None:
            raise UserError(
                "--sites: a public cohort is one folder (OUT/public), not sites; drop --sites, "
                "or drop --public to write a federation"
            )
        cohort = generate_public_cohort(
            out_dir=Path(args.out),
            patients=args.patients_per_site,
            seed=args.seed,
            matrix=args.matrix,
            progress=True,
            workers=args.workers,
        )
        console.print(
            f"[green]wrote[/green] a public cohort of {len(cohort.cases)} patients to "
            + escape(f"{cohort.folder} (manifest: {cohort.out_dir / 'manifest.json'})")
        )
        return
    summary = generate_federation_data(
        out_dir=Path(args.out),
        sites=3 if args.sites is None else args.sites,
        patients_per_site=args.patients_per_site,
        seed=args.seed,
        matrix=args.matrix,
        progress=True,
        workers=args.workers,
    )
    console.print(
        f"[green]wrote[/green] {len(summary.sites)} simulated site(s) to "
        + escape(f"{summary.out_dir} (manifest: {summary.out_dir / 'manifest.json'})")
    )


def _format_record(record: SiteRound) -> str:
    label = "final" if record.phase == "final" else f"round {record.round + 1}"
    site = escape(record.site)
    if record.missing:
        return f"{label:>8} {site}: [red]no result[/red]"
    if record.refused:
        return f"{label:>8} {site}: [yellow]refused[/yellow] — {escape(record.refused)}"
    dice = "-" if record.val_dice is None else f"{record.val_dice:.3f}"
    parts = [f"{label:>8} {site}: val Dice {dice}"]
    if record.epsilon is not None:
        parts.append(f"epsilon {record.epsilon:.2f}")
    if record.train_loss is not None:
        parts.append(f"loss {record.train_loss:.3f}")
    if record.elapsed_s is not None:
        parts.append(f"{record.elapsed_s:.1f} s")
    return " · ".join(parts)


def _simulate_run(args: argparse.Namespace) -> None:
    from jobs.progress import progress_bar
    from jobs.spec import load_spec
    from server_app.report import write_report
    from server_app.report_build import WEAK_EPSILON
    from server_app.report_render import final_table
    from simulator.federation import discover_sites, run_simulation

    spec = load_spec(args.spec)
    sites = discover_sites(Path(args.data))
    console.print(
        f"[bold]{escape(spec.name)}[/bold]: {spec.training.rounds} round(s) over "
        f"{escape(', '.join(sites))} with FLARE's simulator; "
        f"DP {'on' if spec.privacy.enabled else 'off'}. "
        "Val Dice = the model each site received, on its held-out patients."
    )
    console.print("starting FLARE server and site processes (about 20 s)…")
    rounds = spec.training.rounds
    reported: dict[tuple[str, int], int] = {}
    with progress_bar(unit="rounds", console=console, transient=True) as progress:
        task = progress.add_task(
            f"round 1/{rounds}: waiting for {len(sites)} site(s)", total=rounds
        )

        def on_record(record) -> None:
            progress.console.print(_format_record(record))
            key = (record.phase, record.round)
            reported[key] = reported.get(key, 0) + 1
            if record.phase == "final":
                progress.update(task, description="final validation")
            elif reported[key] == len(sites):
                progress.update(
                    task,
                    completed=record.round + 1,
                    description=f"round {min(record.round + 2, rounds)}/{rounds}: training",
                )

        result = run_simulation(
            spec,
            data_dir=Path(args.data),
            out_dir=Path(args.out),
            threads=args.threads,
            on_record=on_record,
            model_store=Path(args.spec).resolve().parent,  # where model.init's file is
        )
    report = write_report(
        result.history, spec=spec.to_plain(), out_dir=result.out_dir, wall_s=result.wall_s
    )
    print_table(final_table(report))
    if report.stopped_reason:
        console.print(f"[yellow]stopped early:[/yellow] {escape(report.stopped_reason)}")
    epsilons = [row.epsilon for row in report.per_site if row.epsilon is not None]
    if epsilons and max(epsilons) > WEAK_EPSILON:
        console.print(
            f"[yellow]weak privacy:[/yellow] epsilon up to {max(epsilons):.1f} "
            f"(> {WEAK_EPSILON:g}) gives little formal protection; see report.md"
        )
    console.print(
        escape(
            f"report: {result.out_dir / 'report.md'}, {result.out_dir / 'report.json'}; "
            f"models: {result.out_dir / 'models'}; FLARE logs: {result.workspace}"
        )
    )


def _simulate_compare(args: argparse.Namespace) -> None:
    from jobs.spec import load_spec
    from simulator.compare import run_compare
    from simulator.compare_render import comparison_table, ratio_lines, sweep_table
    from simulator.compare_specs import CompareError

    spec = load_spec(args.spec)
    console.print(
        f"[bold]{escape(spec.name)}[/bold]: local-only, pooled, FedAvg and FedAvg + DP, each "
        f"{spec.training.rounds * spec.training.local_epochs} epochs"
        + (f"; then a sweep over epsilon {args.epsilons}" if args.epsilons else "")
    )
    try:
        comparison = run_compare(
            spec,
            data_dir=Path(args.data),
            out_dir=Path(args.out),
            dp_epsilon=args.dp_epsilon,
            epsilons=args.epsilons or (),
            threads=args.threads,
            console=console,
            model_store=Path(args.spec).resolve().parent,
        )
    except CompareError as error:
        raise UserError(str(error)) from None
    print_table(comparison_table(comparison))
    for line in ratio_lines(comparison):
        console.print(line, markup=False)
    if comparison.sweep:
        print_table(sweep_table(comparison))
    for note in comparison.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    out = Path(args.out) / "compare"
    console.print(f"results: {out / 'compare.md'}, {out / 'compare.json'}", markup=False)


def _epsilon_list(text: str) -> tuple[float, ...]:
    from simulator.compare_specs import CompareError, parse_epsilons

    try:
        return parse_epsilons(text)
    except CompareError as error:  # argparse names the option itself
        raise argparse.ArgumentTypeError(str(error).removeprefix("--epsilons: ")) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def register(commands: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add ``fedseg simulate`` and its commands; returns its sub-commands (pretrain joins them)."""
    simulate = commands.add_parser("simulate", help="simulated sites on this machine")
    sim_commands = simulate.add_subparsers(dest="simulate_command", required=True)
    data = sim_commands.add_parser("data", help="write synthetic DICOM for N simulated sites")
    data.add_argument("--sites", type=int_at_least(1), default=None, help="(default 3)")
    data.add_argument(
        "--patients-per-site",
        type=int_at_least(2),
        default=12,
        help="good patients per site (broken inputs are added on top); with --public, the "
        "cohort's patients",
    )
    data.add_argument("--seed", type=int, default=0)
    data.add_argument(
        "--matrix", type=int_at_least(16), default=64, help="in-plane pixels per CT slice"
    )
    data.add_argument(
        "--public",
        action="store_true",
        help="write a public cohort into OUT/public instead: other vendors and calibration, "
        "larger and brighter lesions, no broken inputs (data to pretrain on without DP)",
    )
    data.add_argument(
        "--workers",
        type=int_at_least(1),
        default=None,
        help="processes writing patients (default: one per CPU); the files do not depend on it",
    )
    data.add_argument("--out", required=True, help="output folder (one sub-folder per site)")
    data.set_defaults(handler=_simulate_data)

    run = sim_commands.add_parser("run", help="run a job spec over the simulated sites")
    run.add_argument("spec", help="job spec YAML, e.g. jobs/specs/demo.yaml")
    run.add_argument("--data", required=True, help="folder written by `fedseg simulate data`")
    run.add_argument("--out", required=True, help="results folder")
    run.add_argument(
        "--threads",
        type=int_at_least(1),
        default=None,
        help="site processes at once (default: one per site); fewer swaps sites in and out",
    )
    run.set_defaults(handler=_simulate_run)

    compare = sim_commands.add_parser(
        "compare",
        help="local-only, pooled, FedAvg and FedAvg + DP with the same budget, in one table",
    )
    compare.add_argument("spec", help="job spec YAML, e.g. jobs/specs/demo.yaml")
    compare.add_argument("--data", required=True, help="folder written by `fedseg simulate data`")
    compare.add_argument("--out", required=True, help="results folder (compare/, sweep/)")
    compare.add_argument(
        "--dp-epsilon",
        type=_positive_float,
        default=None,
        help="whole-job target epsilon per site for the FedAvg + DP row "
        "(default: the spec's privacy section)",
    )
    compare.add_argument(
        "--epsilons",
        type=_epsilon_list,
        default=None,
        help="privacy-utility sweep: FedAvg + DP at each target, e.g. 1,4,8,inf (inf = DP off)",
    )
    compare.add_argument(
        "--threads",
        type=int_at_least(1),
        default=None,
        help="site processes at once in FLARE's simulator (default: one per site)",
    )
    compare.set_defaults(handler=_simulate_compare)
    return sim_commands
