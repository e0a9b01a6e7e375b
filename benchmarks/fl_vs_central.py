"""Wall time of FedAvg (FLARE simulator) against centralized training of the same epochs and data.

    .venv/bin/python benchmarks/fl_vs_central.py [--quick] [--spec SPEC] [--data DIR] [--out DIR]

FedAvg: ``run_simulation`` with one site process per site (the simulator's default), in a child
process. Centralized: one LocalJob over every site's patients pooled (the federation's data
folder as one site), ``rounds`` x ``local_epochs`` epochs with the same model, batch size,
optimizer, DP setting and crops, in a child process with all CPU threads. Both read decoded
volumes from a warm cache and include their interpreter's start, so the ratio is what a
researcher waits for either way. Full settings: the demo spec over the demo data (3 sites x 32
patients, generated if --data is missing; about 10 minutes). --quick: the small job of
benchmarks/_measure.py over 3 sites x 6 patients (a few minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

from _measure import SMALL_SPEC, last_json, python_command, run_sampled

SCRIPT = Path(__file__).resolve()


def _spec(args):
    from jobs.spec import load_spec, parse_spec

    if args.quick:
        data = json.loads(json.dumps(SMALL_SPEC))
        data["training"]["local_epochs"] = 2
        return parse_spec(data)
    plain = load_spec(args.spec).to_plain()
    plain.setdefault("evaluation", {})["cross_site"] = False  # centralized has no sites to cross
    return parse_spec(plain)


def child_federated(args, out: Path) -> None:
    from simulator.federation import run_simulation

    result = run_simulation(
        _spec(args), data_dir=Path(args.data), out_dir=out, cache_dir=Path(args.out) / "cache"
    )
    final = [r.val_dice for r in result.history.final if r.val_dice is not None]
    print(
        json.dumps(
            {
                "wall_s": result.wall_s,
                "rounds": result.history.rounds_completed,
                "mean_final_dice": sum(final) / len(final) if final else None,
            }
        )
    )


def child_central(args, out: Path) -> None:
    from jobs.model import initial_weights
    from site_app.local_job import LocalJob
    from site_app.policy import PrivacyPolicy
    from site_app.site_config import SiteConfig

    spec = _spec(args)
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    config = SiteConfig.model_validate(
        {
            "data_dir": str(Path(args.data).resolve()),  # every site's folder, walked as one
            "cache_dir": str(Path(args.out).resolve() / "cache" / "central"),
            "num_threads": os.cpu_count() or 1,
            "policy": PrivacyPolicy.for_simulated_data().model_dump(mode="json"),
        }
    )
    # The job's state and the epsilon ledger (its parent folder) start fresh every run.
    job = LocalJob(spec=spec, site="central", config=config, state_dir=out / "job", simulation=True)
    setup = time.perf_counter() - started
    weights = initial_weights(
        spec.model, spec.training.seed, model_store=Path(args.spec).resolve().parent
    )
    steps = 0
    for round_index in range(spec.training.rounds):
        weights, meta = job.train_round(weights, round_index)
        steps += meta["num_steps"]
    final = job.validate(weights)
    print(
        json.dumps(
            {
                "wall_s": time.perf_counter() - started,
                "setup_s": setup,
                "steps": steps,
                "train_patients": len(job.train_patients),
                "final_dice": final.get("val_dice"),
            }
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--spec", default="jobs/specs/demo.yaml")
    parser.add_argument("--data", help="simulated sites (default: results/bench/... generated)")
    parser.add_argument("--out", default="results/bench/fl-vs-central")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.data is None:
        args.data = "results/bench/fl-central-data-" + ("quick" if args.quick else "demo")
    args.data, args.out = str(Path(args.data).resolve()), str(Path(args.out).resolve())

    if args.child:
        kind, out = args.child
        (child_federated if kind == "fl" else child_central)(args, Path(out))
        return 0

    from simulator.synthetic_data import generate_federation_data

    if args.quick:
        generate_federation_data(out_dir=Path(args.data), sites=3, patients_per_site=6, matrix=32)
    elif not Path(args.data).is_dir():
        generate_federation_data(out_dir=Path(args.data), sites=3, patients_per_site=32)
    spec = _spec(args)
    flags = ["--data", args.data, "--out", args.out] + (["--quick"] if args.quick else [])
    if not args.quick:
        flags += ["--spec", args.spec]
    print(
        f"job {spec.name}: UNet {list(spec.model.channels)}, {spec.training.rounds} rounds x "
        f"{spec.training.local_epochs} epochs, batch {spec.training.batch_size}, DP "
        f"{'on' if spec.privacy.enabled else 'off'}; data {args.data}; {os.cpu_count()} CPU(s)"
    )
    out = Path(args.out)
    # Warm both caches (each site's, and the pooled one) so neither timed run decodes DICOM.
    from simulator.federation import discover_sites
    from site_app.ingestion import ingest_site

    cache = out / "cache"
    for site in discover_sites(Path(args.data)):
        ingest_site(Path(args.data) / site, cache_dir=cache / site)
    ingest_site(Path(args.data), cache_dir=cache / "central")

    fl_wall, fl_peak, stdout = run_sampled(
        python_command(SCRIPT, *flags, "--child", "fl", str(out / "fedavg"))
    )
    fl = last_json(stdout)
    central_wall, central_peak, stdout = run_sampled(
        python_command(SCRIPT, *flags, "--child", "central", str(out / "central"))
    )
    central = last_json(stdout)
    fl_dice = "-" if fl["mean_final_dice"] is None else f"{fl['mean_final_dice']:.3f}"
    central_dice = "-" if central["final_dice"] is None else f"{central['final_dice']:.3f}"
    print(
        f"FedAvg: {fl_wall:.1f} s wall (FLARE run {fl['wall_s']:.1f} s), peak tree RSS "
        f"{fl_peak.rss / 2**20:.0f} MiB, mean final Dice {fl_dice}"
    )
    print(
        f"centralized: {central_wall:.1f} s wall (set-up {central['setup_s']:.1f} s, "
        f"{central['steps']} steps over {central['train_patients']} patients), peak RSS "
        f"{central_peak.rss / 2**20:.0f} MiB, final Dice {central_dice}"
    )
    print(f"ratio FedAvg wall / centralized wall: {fl_wall / central_wall:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
