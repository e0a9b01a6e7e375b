"""PNG plots for the run report (matplotlib, headless): epsilon over rounds per site."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display at the aggregator or in CI

import matplotlib.pyplot as plt  # after use("Agg"): the backend must be chosen first

from server_app.history import RunHistory

__all__ = ["plot_epsilon"]


def plot_epsilon(history: RunHistory, path: Path) -> Path | None:
    """Epsilon spent so far after each round, one line per site; refused rounds marked with x.

    Returns the written path, or None when no site reported epsilon (DP off).
    """
    series = {}
    for site in history.sites:
        points = sorted(
            (r.round + 1, r.epsilon, r.refused is not None)
            for r in history.rounds
            if r.site == site and r.epsilon is not None
        )
        if points:
            series[site] = points
    if not series:
        return None
    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    for site, points in series.items():
        rounds = [p[0] for p in points]
        axes.plot(rounds, [p[1] for p in points], marker="o", label=site)
        refused = [(p[0], p[1]) for p in points if p[2]]
        if refused:
            axes.scatter(*zip(*refused, strict=True), marker="x", s=80, color="red", zorder=3)
    axes.set_xlabel("round")
    axes.set_ylabel("epsilon spent so far (this job)")
    axes.set_title(f"{history.job_name}: privacy spent per site (x = round refused)")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
