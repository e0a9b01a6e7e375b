"""Synthetic data generation: the generator before the speed-up against today's, side by side.

    .venv/bin/python benchmarks/data_generation.py [--quick] [--baseline REF] [--workers N]
        [--sizes 32,200]

For each size (3 sites x 32 and 3 sites x 200 good patients, seed 0, matrix 64; `--quick`:
3 x 8), runs `generate_federation_data` of the baseline commit (default c5b243a, the last one
before the speed-up; extracted with `git archive`, nothing in the checkout changes), then of the
working tree with one worker process and with its default (one per CPU), each in a child process
of its own, into an empty folder that is deleted afterwards. Prints per run the wall of the
whole child (imports, worker pool, manifest), patients written per second (good and broken
ones), the CPU seconds of the process tree and patients per CPU second (what other users of a
shared machine disturb least), files written, slices per series, the peak memory of the process
tree (PSS) and the 1-minute load average when it started (compare walls whose loads are alike),
then the ratios.

Goal (issue "A private model worth having"): 3 x 200 in <= 2 min on a 2-core machine. The
baseline's 3 x 200 takes several minutes on its own.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from _measure import run_sampled

REPO = Path(__file__).resolve().parents[1]
BASELINE = "c5b243a"
SITES = 3
SEED = 0
MATRIX = 64

# Run in the child: the tree given first on sys.path wins over the editable install.
_CHILD = """
import json, sys
root, out, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sys.path.insert(0, root)
from pathlib import Path
from simulator.synthetic_data import generate_federation_data
if __name__ == "__main__":
    summary = generate_federation_data(out_dir=Path(out), **options)
    print(json.dumps({
        "patients": sum(site.patients_written for site in summary.sites),
        "files": sum(site.files_written for site in summary.sites),
        "slices": [site.slices_per_series for site in summary.sites],
    }))
"""


def _baseline_tree(ref: str, into: Path) -> Path:
    """The repository at `ref`, extracted into `into` (read from git; the checkout is untouched)."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", ref],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def _generate(root: Path, out: Path, options: dict) -> dict:
    """Wall, peak tree memory and what one child wrote; `out` is deleted afterwards."""
    command = [sys.executable, "-c", _CHILD, str(root), str(out), json.dumps(options)]
    load = os.getloadavg()[0]
    cpu_before = _children_cpu_s()
    try:
        wall, peak, stdout = run_sampled(command, interval_s=0.5)
        cpu = _children_cpu_s() - cpu_before
    finally:
        shutil.rmtree(out, ignore_errors=True)
    result = json.loads(stdout.strip().splitlines()[-1])
    pss_mb = peak.pss / 2**20
    return {
        **result,
        "wall_s": wall,
        "cpu_s": cpu,
        "pss_mb": pss_mb,
        "processes": peak.processes,
        "load": load,
    }


def _children_cpu_s() -> float:
    """User + system CPU seconds of every finished descendant (the workers count via the child)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _row(label: str, run: dict) -> str:
    return (
        f"  {label:<16} {run['wall_s']:6.1f} s {run['patients'] / run['wall_s']:6.2f} patients/s"
        f"  CPU {run['cpu_s']:6.1f} s {run['patients'] / run['cpu_s']:5.2f} patients/CPU-s"
        f" {run['files']:6d} files  slices {run['slices']}  peak PSS {run['pss_mb']:4.0f} MB"
        f" ({run['processes']} processes)  load {run['load']:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 sites x 8 patients only")
    parser.add_argument(
        "--sizes", default="32,200", help="good patients per site, comma-separated (32,200)"
    )
    parser.add_argument("--baseline", default=BASELINE, help=f"git ref to compare ({BASELINE})")
    args = parser.parse_args()
    sizes = [8] if args.quick else [int(size) for size in args.sizes.split(",")]

    work = Path(tempfile.mkdtemp(prefix="fedseg-datagen-bench-"))
    try:
        baseline = _baseline_tree(args.baseline, work / "baseline")
        print(
            f"{SITES} sites, seed {SEED}, matrix {MATRIX}; before = {args.baseline}, "
            "after = working tree",
            flush=True,
        )
        summary = []
        for size in sizes:
            options = {"sites": SITES, "patients_per_site": size, "seed": SEED, "matrix": MATRIX}
            print(f"\n{SITES} x {size} patients (+2 broken per site)", flush=True)
            runs = {}
            for label, root, extra in (
                ("before", baseline, {}),
                ("after, 1 worker", REPO, {"workers": 1}),
                ("after", REPO, {}),
            ):
                runs[label] = _generate(root, work / "out", {**options, **extra})
                print(_row(label, runs[label]), flush=True)
            summary.append((size, runs))
        print()
        for size, runs in summary:
            before, serial, after = runs["before"], runs["after, 1 worker"], runs["after"]
            print(
                f"{SITES} x {size}: before {before['wall_s']:.1f} s, after {after['wall_s']:.1f} s"
                + (" (goal <= 120 s)" if size == 200 else "")
                + f"; wall before / after {before['wall_s'] / after['wall_s']:.1f}x (one worker "
                f"{before['wall_s'] / serial['wall_s']:.1f}x, the pool "
                f"{serial['wall_s'] / after['wall_s']:.1f}x); CPU before / after one worker "
                f"{before['cpu_s'] / serial['cpu_s']:.1f}x; files {before['files']} -> "
                f"{after['files']}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
