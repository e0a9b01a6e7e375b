"""PNG plots for the run report (matplotlib, headless): validation Dice and epsilon over rounds per
site, and subgroup Dice bars. Each returns the written path, or None when there is nothing to plot.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from server_app.history import RunHistory
from server_app.report_schema import Subgroups

__all__ = ["plot_dice", "plot_epsilon", "plot_subgroups"]

_PNG_METADATA = {"Software": None}  # keep the bytes independent of the matplotlib version


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, metadata=_PNG_METADATA)
    return path


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
    figure = Figure(figsize=(6, 4), dpi=100)
    axes = figure.subplots()
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
    return _save(figure, path)


def plot_dice(history: RunHistory, path: Path) -> Path | None:
    """Validation Dice of the global model after k rounds (k = 0: untrained), one line per site,
    measured on the site's held-out patients; the last point is the final global model.

    Returns the written path, or None when no site reported a Dice.
    """
    series = {}
    for site in history.sites:
        points = sorted(
            (r.round, r.val_dice)
            for r in [*history.rounds, *history.final]
            if r.site == site and r.val_dice is not None
        )
        if points:
            series[site] = points
    if not series:
        return None
    figure = Figure(figsize=(6, 4), dpi=100)
    axes = figure.subplots()
    for site, points in series.items():
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=site)
    axes.set_xlabel("global model after round (0 = untrained)")
    axes.set_ylabel("validation Dice (held-out patients)")
    axes.set_ylim(0, 1)
    axes.set_title(f"{history.job_name}: Dice per site")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)


def plot_subgroups(subgroups: Subgroups, path: Path) -> Path | None:
    """Pooled Dice per subgroup, one panel per attribute; suppressed cells drawn as an empty bar
    labelled ``<N``. ``subgroups`` is the report's (``server_app.report_schema``).

    Returns the written path, or None when no attribute has a cell to show.
    """
    pooled = {(c.attribute, c.value): c for c in subgroups.pooled}
    panels = {a: v for a, v in subgroups.attributes.items() if v}
    if not panels or not pooled:
        return None
    marker = f"<{subgroups.min_cell_size}"
    figure = Figure(figsize=(3.2 * len(panels), 3.6), dpi=100)
    axes = figure.subplots(1, len(panels), squeeze=False)
    for ax, (attribute, values) in zip(axes[0], panels.items(), strict=True):
        heights = [pooled[(attribute, v)].dice if (attribute, v) in pooled else 0 for v in values]
        bars = ax.bar(range(len(values)), heights, color="tab:blue")
        for bar, value in zip(bars, values, strict=True):
            cell = pooled.get((attribute, value))
            if cell is None:
                bar.set_hatch("//")
                bar.set_facecolor("none")
                ax.text(bar.get_x() + bar.get_width() / 2, 0.02, marker, ha="center", fontsize=8)
            else:
                ax.text(
                    bar.get_x() + bar.get_width() / 2,
                    bar.get_height() + 0.02,
                    f"n={cell.n}",
                    ha="center",
                    fontsize=8,
                )
        ax.set_xticks(range(len(values)), values, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.1)
        ax.set_title(attribute.replace("_", " "), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("pooled Dice (final global model)")
    figure.suptitle(f"Dice by subgroup ({marker} patients: suppressed at every site)", fontsize=10)
    return _save(figure, path)
