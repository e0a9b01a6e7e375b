"""Simulator wall time and memory over 1..20 sites, next to the same work trained without FLARE.

    .venv/bin/python benchmarks/sites_scale.py [--quick] [--sites 1,5,10,20] [--threads 2]
        [--data DIR] [--out DIR] [--cross-site]

For each site count N: fedseg's simulator (``run_simulation``: FLARE SimEnv, real site
processes) runs a small DP job (benchmarks/_measure.py SMALL_SPEC: UNet 4-8, 16³ crops, 2 rounds,
3 patients per site) with a bounded pool of ``--threads`` site processes, in a child process
whose whole process tree is sampled for memory (sum of RSS, and of PSS, which splits shared
library pages between processes). Then "pure training": the same sites, model, data and steps
(LocalJob, one site after another, no FLARE) in one process. Both read decoded volumes from the
same warm cache. Where the seconds go: fresh-interpreter import times of what a FLARE site
process loads, a site's LocalJob set-up cold and warm, and from FLARE's server log the time from
a site process being started to its task being fetched, and from fetch to result. The smallest
pooled site count is also run with one process per site (no pool), and its final model
compared with the pooled run's: they must be bit-identical. The last lines are ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

from _measure import SMALL_SPEC, last_json, python_command, run_sampled, site_subset

SCRIPT = Path(__file__).resolve()
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
_STARTED = re.compile(r"Simulate Run client: (\S+) ")
_FETCHED = re.compile(r"return task to client\.\s+client_name: (\S+)\s+task_name: (\S+)")
_SUBMITTED = re.compile(r"submit_update process\. client_name:(\S+)\s")


def _spec(cross_site: bool):
    from jobs.spec import parse_spec

    data = json.loads(json.dumps(SMALL_SPEC))
    data["evaluation"]["cross_site"] = cross_site
    return parse_spec(data)


# -- child processes -----------------------------------------------------------------------------


def child_simulation(sites: int, threads: int, out: Path, data: Path, cache: Path, cross: bool):
    from simulator.federation import run_simulation

    subset = site_subset(data, sites, out.parent / f"data-{sites}")
    result = run_simulation(
        _spec(cross), data_dir=subset, out_dir=out, threads=threads, cache_dir=cache
    )
    history = result.history
    print(
        json.dumps(
            {
                "wall_s": result.wall_s,
                "rounds_completed": history.rounds_completed,
                "site_round_s": sum(r.elapsed_s or 0 for r in history.rounds),
                "workspace": str(result.workspace),
            }
        )
    )


def child_pure(sites: int, out: Path, data: Path, cache: Path) -> None:
    """The same work without FLARE: each site's LocalJob, its rounds, its final validation."""
    import shutil

    import torch

    from jobs.model import initial_weights
    from simulator.federation import threads_per_site
    from site_app.local_job import LocalJob
    from site_app.policy import PrivacyPolicy
    from site_app.site_config import SiteConfig

    spec = _spec(cross_site=False)
    threads = threads_per_site(sites)  # as the simulator gives each site
    started = time.perf_counter()
    setup, train, validate = [], 0.0, 0.0
    for index in range(1, sites + 1):
        site = f"site-{index}"
        shutil.rmtree(out / site, ignore_errors=True)  # the site's ledger lives there too
        state = out / site / "job"
        config = SiteConfig.model_validate(
            {
                "data_dir": str(data / site),
                "cache_dir": str(cache / site),
                "num_threads": threads,
                "policy": PrivacyPolicy.for_simulated_data().model_dump(mode="json"),
            }
        )
        clock = time.perf_counter()
        job = LocalJob(spec=spec, site=site, config=config, state_dir=state, simulation=True)
        setup.append(time.perf_counter() - clock)
        weights = initial_weights(spec.model, spec.training.seed)
        clock = time.perf_counter()
        for round_index in range(spec.training.rounds):
            weights, _ = job.train_round(weights, round_index)
        train += time.perf_counter() - clock
        clock = time.perf_counter()
        job.validate(weights)
        validate += time.perf_counter() - clock
    print(
        json.dumps(
            {
                "wall_s": time.perf_counter() - started,
                "setup_s": setup,
                "train_s": train,
                "validate_s": validate,
                "threads": threads,
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


# -- where the seconds go ------------------------------------------------------------------------


def import_times() -> dict[str, float]:
    """Wall seconds of a fresh interpreter importing what a FLARE site process loads."""
    steps = {
        "python alone": "pass",
        "FLARE's site worker module": "import nvflare.private.fed.app.simulator.simulator_worker",
        "torch": "import torch",
        "MONAI (loads all its submodules)": "import monai",
        "Opacus": "import opacus",
        "fedseg's site executor (all of the above + ours)": "import site_app.executor",
    }
    times = {}
    for label, statement in steps.items():
        clock = time.perf_counter()
        subprocess.run([sys.executable, "-c", statement], check=True, capture_output=True)
        times[label] = time.perf_counter() - clock
    return times


def task_phases(server_log: Path) -> dict[str, list[float]]:
    """From FLARE's server log: site process started -> task fetched -> result submitted."""
    started: dict[str, datetime] = {}
    fetched: dict[str, datetime] = {}
    phases: dict[str, list[float]] = {"start_to_fetch": [], "fetch_to_result": []}
    for line in server_log.read_text().splitlines():
        stamp = _LOG_TIME.match(line)
        if not stamp:
            continue
        when = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f")
        if match := _STARTED.search(line):
            started[match.group(1)] = when
        elif (match := _FETCHED.search(line)) and not match.group(2).startswith("__"):
            site = match.group(1)
            fetched[site] = when
            if site in started:
                phases["start_to_fetch"].append((when - started.pop(site)).total_seconds())
        elif (match := _SUBMITTED.search(line)) and match.group(1) in fetched:
            elapsed = when - fetched.pop(match.group(1))
            phases["fetch_to_result"].append(elapsed.total_seconds())
    return phases


def _same_final_model(a: Path, b: Path) -> bool:
    import torch

    left = torch.load(a / "models" / "final_model.pt")
    right = torch.load(b / "models" / "final_model.pt")
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def _mean(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f}" if values else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1, 2 and 4 sites (a few minutes)")
    parser.add_argument("--sites", help="comma-separated site counts (default 1,5,8,10,20)")
    parser.add_argument("--threads", type=int, default=2, help="site processes at once (pool)")
    parser.add_argument("--data", default="results/bench/sites-data")
    parser.add_argument("--out", default="results/bench/sites-scale")
    parser.add_argument("--cross-site", action="store_true", help="keep cross-site evaluation")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    data, out = Path(args.data).resolve(), Path(args.out).resolve()
    cache = out / "cache"

    if args.child:
        kind, *rest = args.child
        if kind == "sim":
            sites, threads = int(rest[0]), int(rest[1])
            child_simulation(sites, threads, Path(rest[2]), data, cache, args.cross_site)
        else:
            child_pure(int(rest[0]), Path(rest[1]), data, cache)
        return 0

    counts = [1, 2, 4] if args.quick else [1, 5, 8, 10, 20]
    if args.sites:
        counts = [int(text) for text in args.sites.split(",")]
    from simulator.synthetic_data import generate_federation_data

    generate_federation_data(
        out_dir=data, sites=max(counts), patients_per_site=3, seed=0, matrix=32
    )
    flags = ["--data", str(data), "--out", str(out)] + (["--cross-site"] if args.cross_site else [])
    spec = _spec(args.cross_site)
    print(
        f"job: UNet {list(spec.model.channels)}, crop {list(spec.model.roi_size)}, "
        f"{spec.training.rounds} rounds x {spec.training.local_epochs} epoch, DP "
        f"{spec.privacy.grad_sample_mode.value}, 3 patients per site, cross-site evaluation "
        f"{'on' if args.cross_site else 'off'}; pool of {args.threads} site processes; "
        f"{os.cpu_count()} CPU(s)"
    )

    # Warm the decoded-volume cache for every site once, so no run below decodes DICOM.
    subprocess.run(
        python_command(SCRIPT, *flags, "--child", "pure", str(max(counts)), str(out / "warm")),
        check=True,
        capture_output=True,
    )

    rows, compared = [], False
    for sites in counts:
        pool = min(args.threads, sites)
        run_dir = out / f"sim-{sites}-pool-{pool}"
        command = python_command(SCRIPT, *flags, "--child", "sim", str(sites), str(pool))
        wall, peak, stdout = run_sampled([*command, str(run_dir)])
        sim = last_json(stdout)
        pure_wall, pure_peak, stdout = run_sampled(
            python_command(SCRIPT, *flags, "--child", "pure", str(sites), str(out / "pure"))
        )
        pure = last_json(stdout)
        phases = task_phases(Path(sim["workspace"]) / "server" / "log.txt")
        row = {
            "sites": sites,
            "pool": pool,
            "wall_s": wall,
            "sim_s": sim["wall_s"],
            "rss": peak.rss,
            "pss": peak.pss,
            "processes": peak.processes,
            "pure_wall_s": pure_wall,  # the process, imports included, like the simulator's
            "pure_train_s": pure["train_s"] + pure["validate_s"],
            "pure_setup_s": pure["setup_s"],
            "pure_rss": pure_peak.rss,
            "phases": phases,
        }
        rows.append(row)
        print(
            f"{sites:>3} sites, pool {pool}: simulator {wall:6.1f} s wall, peak tree RSS "
            f"{peak.rss / 2**20:6.0f} MiB, PSS {peak.pss / 2**20:6.0f} MiB ({peak.processes} "
            f"processes); pure training {pure_wall:5.1f} s (in-process {pure['wall_s']:.1f} s: "
            "set-up "
            f"{sum(pure['setup_s']):.1f} s, rounds + validation {row['pure_train_s']:.1f} s), "
            f"RSS {pure_peak.rss / 2**20:.0f} MiB; per site task: process start -> task fetched "
            f"{_mean(phases['start_to_fetch'])} s, fetched -> result "
            f"{_mean(phases['fetch_to_result'])} s"
        )
        if pool < sites and not compared:  # once: the smallest pooled count
            compared = True
            unpooled_dir = out / f"sim-{sites}-pool-{sites}"
            wall_u, peak_u, _ = run_sampled([*command[:-1], str(sites), str(unpooled_dir)])
            same = _same_final_model(run_dir.resolve(), unpooled_dir.resolve())
            print(
                f"{sites:>3} sites, one process per site: {wall_u:6.1f} s wall, peak tree RSS "
                f"{peak_u.rss / 2**20:6.0f} MiB, PSS {peak_u.pss / 2**20:6.0f} MiB; final model "
                f"bit-identical to the pool of {pool}: {same}"
            )

    print("where a site process's seconds go (fresh interpreter, wall):")
    for label, seconds in import_times().items():
        print(f"  import {label}: {seconds:.1f} s")
    first = rows[-1]["pure_setup_s"]
    print(
        f"  LocalJob set-up (ingest from cache, prepare, build, make_private): first in a process "
        f"{first[0]:.2f} s, then {statistics.median(first[1:]) if len(first) > 1 else 0:.2f} s"
    )

    base = rows[0]
    for row in rows:
        print(
            f"ratio simulator wall / pure training wall ({row['sites']} sites, pool "
            f"{row['pool']}): {row['wall_s'] / row['pure_wall_s']:.1f}x "
            f"(/ rounds + validation only: {row['wall_s'] / row['pure_train_s']:.1f}x)"
        )
    for row in rows[1:]:
        print(
            f"ratio peak memory {row['sites']} sites / {base['sites']} site(s) (pool "
            f"{row['pool']}): RSS {row['rss'] / base['rss']:.2f}x, PSS "
            f"{row['pss'] / base['pss']:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
