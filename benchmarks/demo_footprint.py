"""Wall time and peak memory of a simulated federation, whole process tree, side by side with
the time the sites spent training.

    .venv/bin/python benchmarks/demo_footprint.py [SPEC] [--data DIR] [--out DIR]

Runs `fedseg simulate run` as a child process, samples the resident memory of it and all its
descendants (FLARE server + one process per site) every 0.2 s, and prints as its last lines:
wall seconds, peak tree RSS, the sum of the sites' reported round times, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil


def _tree_rss(process: psutil.Process) -> int:
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default="jobs/specs/demo.yaml")
    parser.add_argument("--data", default="data/demo")
    parser.add_argument("--out", default="results/footprint")
    args = parser.parse_args()

    fedseg = Path(sys.executable).with_name("fedseg")
    command = [str(fedseg), "simulate", "run", args.spec, "--data", args.data, "--out", args.out]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    process = psutil.Process(child.pid)
    peak = 0
    while child.poll() is None:
        peak = max(peak, _tree_rss(process))
        time.sleep(0.2)
    wall = time.perf_counter() - started
    if child.returncode != 0:
        print(f"fedseg exited with {child.returncode}; run it directly to see why", file=sys.stderr)
        return child.returncode

    history = json.loads((Path(args.out) / "history.json").read_text())
    site_seconds = sum(r["elapsed_s"] or 0 for r in history["rounds"])
    sites = len(history["sites"])
    print(f"command: {' '.join(command)}")
    print(f"wall_s: {wall:.1f}")
    print(f"peak_tree_rss_mib: {peak / 2**20:.0f}")
    print(f"site_round_seconds_sum: {site_seconds:.1f} over {sites} sites")
    print(f"site_round_seconds_per_site / wall: {site_seconds / sites / wall:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
