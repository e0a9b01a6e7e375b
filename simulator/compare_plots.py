"""The comparison's plot: the privacy-utility sweep (Dice against target epsilon) as a PNG,
drawn with matplotlib's object API (no pyplot, no backend switching).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from simulator.compare_results import SweepPoint

__all__ = ["plot_privacy_utility"]


def plot_privacy_utility(sweep: Sequence[SweepPoint], path: Path) -> Path | None:
    """Mean Dice (and each site's) against the target epsilon; DP off as a dashed line."""
    finite = [p for p in sweep if not math.isinf(p.target_epsilon)]
    off = [p for p in sweep if math.isinf(p.target_epsilon)]
    if not sweep:
        return None
    figure = Figure(figsize=(6, 4), dpi=100)
    axes = figure.subplots()
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
    return path
