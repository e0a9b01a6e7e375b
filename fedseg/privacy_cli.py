"""``fedseg simulate pretrain`` and ``fedseg privacy plan``: parsing and printing only.

The work is done by ``simulator.pretrain`` (the public model) and ``site_app.privacy_plan``
(what DP will cost a site, before any data is read).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.markup import escape

from fedseg.terminal import console, int_at_least, print_table

# -- simulate pretrain ---------------------------------------------------------------------------


def _pretrain_argv(args: argparse.Namespace) -> list[str]:
    argv = [
        "simulate",
        "pretrain",
        args.spec,
        "--out",
        args.out,
        "--public-patients",
        str(args.public_patients),
        "--public-seed",
        str(args.public_seed),
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--lr",
        repr(args.lr),
        "--seed",
        str(args.seed),
    ]
    if args.work:
        argv += ["--work", args.work]
    return argv


def _pretrain(args: argparse.Namespace) -> int:
    from jobs.progress import progress_bar
    from jobs.spec import load_spec
    from simulator.pretrain import (
        PORTABLE_ENVIRONMENT,
        PretrainSettings,
        is_portable,
        pretrain_public_model,
    )

    spec = load_spec(args.spec)  # checked here, before a process is started for it
    if not is_portable() and not args.native_arithmetic:
        # numpy and torch read these when they are imported: a fresh process, same command.
        console.print("restarting in portable arithmetic (same bytes on any x86-64 CPU)…")
        child = [sys.executable, "-m", "fedseg.cli", *_pretrain_argv(args)]
        return subprocess.call(child, env={**os.environ, **PORTABLE_ENVIRONMENT})
    settings = PretrainSettings(
        public_patients=args.public_patients,
        public_seed=args.public_seed,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
    )
    with (
        tempfile.TemporaryDirectory() as scratch,
        progress_bar(console=console, transient=True) as bar,
    ):
        task = bar.add_task("public cohort, then training", total=settings.epochs)
        result = pretrain_public_model(
            spec,
            out=Path(args.out),
            work_dir=Path(args.work) if args.work else Path(scratch),
            settings=settings,
            on_epoch=lambda done, total: bar.update(task, completed=done, description="training"),
        )
    arithmetic = "portable" if result.portable else "native (this CPU only)"
    console.print(
        f"[green]wrote[/green] {escape(str(result.path))}: {result.patients} public patients, "
        f"{result.steps} steps, {result.wall_s:.0f} s, {arithmetic} arithmetic",
    )
    console.print(f"sha256 {result.sha256}; use it in a spec:", markup=False)
    console.print(
        f"model:\n  init: {{file: {result.path.name}, sha256: {result.sha256}}}", markup=False
    )
    return 0


# -- privacy plan --------------------------------------------------------------------------------


def _plan(args: argparse.Namespace) -> int:
    from jobs.spec import load_spec
    from site_app.privacy_plan import PlanError, plan_privacy, plan_table

    spec = load_spec(args.spec)
    try:
        plan = plan_privacy(spec, patients=args.patients)
    except PlanError as error:
        raise ValueError(str(error)) from None

    print_table(plan_table(plan))
    for line in plan.notes:
        console.print(f"note: {line}", markup=False)
    return 0


def register(commands, sim_commands) -> None:
    """Add the commands to ``fedseg``'s parser (``commands``: top level; ``sim_commands``:
    under ``simulate``)."""
    pretrain = sim_commands.add_parser(
        "pretrain",
        help="train the public model (no DP) on a simulated public cohort, reproducibly",
    )
    pretrain.add_argument("spec", help="job spec whose model and data sections to use")
    pretrain.add_argument("--out", required=True, help="weights file to write (a .pt state dict)")
    pretrain.add_argument("--public-patients", type=int_at_least(2), default=100)
    pretrain.add_argument("--public-seed", type=int_at_least(0), default=0)
    pretrain.add_argument("--epochs", type=int_at_least(1), default=30)
    pretrain.add_argument("--batch-size", type=int_at_least(1), default=16)
    pretrain.add_argument("--lr", type=float, default=0.003)
    pretrain.add_argument("--seed", type=int_at_least(0), default=0)
    pretrain.add_argument(
        "--work", help="folder for the public cohort and its cache (default: temporary)"
    )
    pretrain.add_argument(
        "--native-arithmetic",
        action="store_true",
        help="this CPU's fastest kernels (about 1.65x faster; the bytes then differ by CPU)",
    )
    pretrain.set_defaults(handler=_pretrain)

    privacy = commands.add_parser("privacy", help="differential privacy, before spending it")
    privacy_commands = privacy.add_subparsers(dest="privacy_command", required=True)
    plan = privacy_commands.add_parser(
        "plan", help="what a spec's DP will be at sites of given sizes (no data read)"
    )
    plan.add_argument("spec", help="job spec YAML")
    plan.add_argument(
        "--patients",
        type=int_at_least(1),
        nargs="+",
        required=True,
        help="training patients of each site (one number per site)",
    )
    plan.set_defaults(handler=_plan)
