"""The comparison shown and written: terminal tables (rich), the ratio verdict lines, and
``<out>/compare/compare.md`` and ``compare.json`` (with the sweep plot in ``<out>/sweep/``).

Dice to 3 decimals, HD95 in mm to 1, epsilon to 2; "-" where a value is missing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from jobs.text_tables import format_number, markdown_table
from server_app.report_build import WEAK_EPSILON
from simulator.baselines import SiteScore
from simulator.compare_plots import plot_privacy_utility
from simulator.compare_results import (
    COMPARE_FOLDER,
    PRIVACY_UTILITY_PLOT,
    SWEEP_FOLDER,
    Comparison,
    Method,
    comparison_ratios,
)

__all__ = ["comparison_table", "ratio_lines", "sweep_table", "write_comparison"]


def _hd95_cell(score: SiteScore) -> str:
    text = format_number(score.hd95_mm, 1)
    return f"{text} ({score.hd95_missing} empty)" if score.hd95_missing else text


def _table_rows(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    header = ["method"]
    for site in comparison.sites:
        header += [f"{site} Dice", f"{site} HD95 mm"]
    header += ["mean Dice", "mean HD95 mm", "epsilon per site", "steps", "wall s"]
    rows = []
    for row in comparison.rows:
        by_site = {s.site: s for s in row.scores}
        cells = [row.label]
        for site in comparison.sites:
            cells += [format_number(by_site[site].dice), _hd95_cell(by_site[site])]
        epsilons = [s.epsilon for s in row.scores]
        cells += [
            format_number(row.mean_dice),
            format_number(row.mean_hd95_mm, 1),
            "-" if row.max_epsilon is None else " / ".join(format_number(e, 2) for e in epsilons),
            str(row.steps),
            f"{row.wall_s:.0f}",
        ]
        rows.append(cells)
    return header, rows


def ratio_lines(comparison: Comparison) -> list[str]:
    """The ratios and the FedAvg vs local-only verdict, one plain line each."""
    ratios = comparison_ratios(comparison.rows)
    dp = comparison.row(Method.FEDAVG_DP)
    dp_eps = "" if dp is None or dp.max_epsilon is None else f" (epsilon ≤ {dp.max_epsilon:.2f})"
    lines = [
        f"FedAvg / pooled mean Dice: {format_number(ratios['fedavg_over_pooled'])} (goal ≥ 0.95)",
        f"FedAvg + DP / FedAvg mean Dice: {format_number(ratios['dp_over_fedavg'])}{dp_eps} "
        "(goal ≥ 0.93 at epsilon ≤ 8 per site)",
    ]
    difference = ratios["fedavg_minus_local_only"]
    if difference is not None:
        verdict = "above" if difference > 0 else "not above"
        lines.append(f"FedAvg mean Dice is {verdict} the local-only mean ({difference:+.3f})")
    gain = ratios["dp_minus_public_only"]
    if gain is not None:
        verdict = "above" if gain > 0 else "NOT above"
        lines.append(
            f"FedAvg + DP mean Dice is {verdict} the public model alone ({gain:+.3f}): what the "
            "private federation added to pretraining"
        )
    local_dp = comparison.row(Method.LOCAL_ONLY_DP)
    if dp is not None and local_dp is not None:
        ahead = {s.site: s.dice for s in dp.scores}
        behind = [
            s.site
            for s in local_dp.scores
            if s.dice is not None and (ahead.get(s.site) or 0.0) <= s.dice
        ]
        lines.append(
            "FedAvg + DP beats each site alone with the same DP at every site"
            if not behind
            else f"FedAvg + DP does not beat local-only + DP at {', '.join(behind)}"
        )
    return lines


def _sweep_rows(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    header = ["target epsilon", "epsilon spent (max site)", "mean Dice", "mean HD95 mm", "run"]
    rows = [
        [
            "inf (DP off)" if math.isinf(p.target_epsilon) else f"{p.target_epsilon:g}",
            format_number(p.result.max_epsilon, 2),
            format_number(p.result.mean_dice),
            format_number(p.result.mean_hd95_mm, 1),
            p.result.run_dir,
        ]
        for p in comparison.sweep
    ]
    return header, rows


def comparison_table(comparison: Comparison) -> Table:
    """The table for a terminal: per site "Dice | HD95", then means, epsilon (max over sites)."""
    table = Table(title=f"Baselines, same training budget — {escape(comparison.job)}")
    table.add_column("method", no_wrap=True)
    for site in comparison.sites:
        table.add_column(f"{site}\nDice | HD95 mm", justify="right", no_wrap=True)
    for column in ("mean\nDice", "mean\nHD95 mm", "epsilon\n(max)", "steps", "wall s"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in comparison.rows:
        by_site = {s.site: s for s in row.scores}
        table.add_row(
            escape(row.label),
            *(
                f"{format_number(by_site[s].dice)} | {_hd95_cell(by_site[s])}"
                for s in comparison.sites
            ),
            format_number(row.mean_dice),
            format_number(row.mean_hd95_mm, 1),
            format_number(row.max_epsilon, 2),
            str(row.steps),
            f"{row.wall_s:.0f}",
        )
    return table


def sweep_table(comparison: Comparison) -> Table:
    header, rows = _sweep_rows(comparison)
    table = Table(title=f"Privacy–utility sweep — {escape(comparison.job)}")
    for column in header:
        table.add_column(column, justify="left" if column == "run" else "right")
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))
    return table


def _markdown(comparison: Comparison) -> str:
    budget = comparison.budget
    parts = [
        f"# fedseg baselines: {comparison.job}",
        "",
        f"- sites: {', '.join(comparison.sites)}; training patients "
        + ", ".join(f"{s} {n}" for s, n in budget["train_patients"].items())
        + "; held-out "
        + ", ".join(f"{s} {n}" for s, n in budget["val_patients"].items()),
        f"- budget: {budget['epochs']} epochs = {budget['rounds']} rounds x "
        f"{budget['local_epochs']} local epochs, batch {budget['batch_size']}, "
        f"{budget['optimizer']} lr {budget['lr']:g} ({budget['lr_schedule']}); "
        f"{budget['definition']}",
        "- scores: final model of each run on each site's held-out patients (the federation's "
        "split); Dice over lesion volumes, HD95 (mm) over those with a non-empty prediction "
        '("n empty": lesion volumes predicted empty, Dice 0, HD95 undefined); means are '
        "unweighted over sites",
        "- privacy of the DP row: "
        + next((r.privacy for r in comparison.rows if r.method == Method.FEDAVG_DP), "-")
        + "; epsilon covers the model updates only, not the reported metrics",
    ]
    dp = comparison.row(Method.FEDAVG_DP)
    if dp is not None and dp.max_epsilon is not None and dp.max_epsilon > WEAK_EPSILON:
        parts.append(
            f"- **weak privacy**: epsilon up to {dp.max_epsilon:.1f} (> {WEAK_EPSILON:g}) gives "
            "little formal protection"
        )
    header, rows = _table_rows(comparison)
    parts += ["", markdown_table(header, rows), ""]
    parts += [f"- {line}" for line in ratio_lines(comparison)]
    if comparison.sweep:
        header, rows = _sweep_rows(comparison)
        parts += [
            "",
            "## Privacy–utility sweep",
            "",
            "FedAvg + DP with `privacy.target_epsilon` = each target for the whole job (each "
            "site's noise is derived from it and its own patient count); inf = DP off. A "
            "target whose run is already above is not run twice (same spec and seed).",
            "",
            markdown_table(header, rows),
            "",
            f"![privacy-utility](../{SWEEP_FOLDER}/{PRIVACY_UTILITY_PLOT})",
        ]
    if comparison.overlays:
        parts += ["", "## Slice overlays (synthetic data)", ""]
        parts += [f"![{Path(p).stem}](../{p})" for p in comparison.overlays]
    if comparison.notes:
        parts += ["", "## Notes", ""] + [f"- {note}" for note in comparison.notes]
    return "\n".join(parts) + "\n"


def write_comparison(comparison: Comparison, out_dir: Path) -> None:
    """compare.json and compare.md in ``<out>/compare/``; the sweep plot in ``<out>/sweep/``."""
    compare_dir = Path(out_dir) / COMPARE_FOLDER
    compare_dir.mkdir(parents=True, exist_ok=True)
    if comparison.sweep:
        plot_privacy_utility(comparison.sweep, Path(out_dir) / SWEEP_FOLDER / PRIVACY_UTILITY_PLOT)
    (compare_dir / "compare.json").write_text(json.dumps(comparison.to_json(), indent=2))
    (compare_dir / "compare.md").write_text(_markdown(comparison))
