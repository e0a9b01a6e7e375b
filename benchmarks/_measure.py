"""Shared by the benchmarks: whole-process-tree memory sampling and the small simulated job.

Not a benchmark itself (the leading underscore keeps it out of the list in README.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

# The small 3D job the scaling figures use: the test suite's tiny UNet (4-8 channels, 16³
# crops of 10 mm voxels), DP on with the shipped per-sample-gradient mode, 2 rounds.
SMALL_SPEC = {
    "name": "bench-small",
    "model": {"channels": [4, 8], "strides": [2], "roi_size": [16, 16, 16]},
    "data": {"target_spacing_mm": [10.0, 10.0, 10.0], "val_fraction": 0.34},
    "training": {"rounds": 2, "local_epochs": 1, "batch_size": 2, "lr": 0.003, "seed": 0},
    "privacy": {"enabled": True, "noise_multiplier": 1.0},
    "federation": {"min_clients": 1},
    # Cross-site evaluation is sites x sites validation tasks, work pure training does not do.
    "evaluation": {"cross_site": False},
}


@dataclass
class TreePeak:
    """Peak memory of a process and all its descendants, sampled while it runs."""

    rss: int = 0
    """Largest sum of resident set sizes (bytes); shared library pages count once per process."""
    pss: int = 0
    """Largest sum of proportional set sizes (bytes): shared pages split between the processes
    sharing them, so the sum is the tree's real footprint (Linux; 0 elsewhere)."""
    processes: int = 0
    samples: list[tuple[float, int]] = field(default_factory=list)


def _tree(process: psutil.Process) -> list[psutil.Process]:
    try:
        return [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def run_sampled(command: list[str], *, interval_s: float = 0.5) -> tuple[float, TreePeak, str]:
    """Run ``command``; return (wall seconds, its tree's peak memory, its stdout)."""
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(child.pid)
    peak = TreePeak()
    output: list[str] = []
    import threading

    def drain(stream, sink):
        sink.append(stream.read())

    readers = [
        threading.Thread(target=drain, args=(child.stdout, output), daemon=True),
        threading.Thread(target=drain, args=(child.stderr, []), daemon=True),
    ]
    for reader in readers:
        reader.start()
    while child.poll() is None:
        rss = pss = 0
        members = _tree(root)
        for member in members:
            try:
                info = member.memory_full_info()
                rss += info.rss
                pss += getattr(info, "pss", 0)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        peak.rss, peak.pss = max(peak.rss, rss), max(peak.pss, pss)
        peak.processes = max(peak.processes, len(members))
        peak.samples.append((time.perf_counter() - started, rss))
        time.sleep(interval_s)
    for reader in readers:
        reader.join()
    wall = time.perf_counter() - started
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {child.returncode}")
    return wall, peak, "".join(output)


def last_json(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError("the child process printed no result line")
    return json.loads(lines[-1])


def site_subset(data_dir: Path, sites: int, into: Path) -> Path:
    """A folder with links to the first ``sites`` site folders of ``data_dir``."""
    into.mkdir(parents=True, exist_ok=True)
    for index in range(1, sites + 1):
        link = into / f"site-{index}"
        if not link.exists():
            link.symlink_to((data_dir / f"site-{index}").resolve(), target_is_directory=True)
    return into


def python_command(script: Path, *args: str) -> list[str]:
    return [sys.executable, str(script), *args]
