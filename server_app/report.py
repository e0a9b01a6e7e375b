"""The run report: report.json (machine-readable) and report.md (for people), from a RunHistory.

Only what the server received is reported: counts, Dice, losses and epsilon per site; nothing
patient-level exists at the server to leak.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.table import Table

from server_app.history import RunHistory, SiteRound
from server_app.plots import plot_epsilon

__all__ = ["WEAK_EPSILON", "build_report", "final_table", "write_report"]

EPSILON_PLOT = "epsilon_per_round.png"
WEAK_EPSILON = 10.0
"""Above this epsilon the report warns that the guarantee is weak (a common rule of thumb)."""


def _num(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def build_report(history: RunHistory, *, spec: dict, wall_s: float | None = None) -> dict:
    """Everything a researcher needs from one run, as plain data."""
    privacy = spec.get("privacy") or {}
    untrained = {r.site: r.val_dice for r in history.rounds if r.round == 0}
    final = {r.site: r for r in history.final}
    last_epsilon: dict[str, float | None] = {}
    budget_left: dict[str, float | None] = {}
    for record in history.rounds:
        if record.epsilon is not None:
            last_epsilon[record.site] = record.epsilon
        if record.budget_left is not None:
            budget_left[record.site] = record.budget_left
    per_site = []
    for site in history.sites:
        final_record = final.get(site)
        per_site.append(
            {
                "site": site,
                "untrained_dice": untrained.get(site),
                "final_dice": final_record.val_dice if final_record else None,
                "val_patients": final_record.val_patients if final_record else None,
                "epsilon": last_epsilon.get(site),
                "budget_left": budget_left.get(site),
                "delta": privacy.get("delta") if privacy.get("enabled") else None,
            }
        )
    refusals = [
        {"site": r.site, "round": r.round, "reason": r.refused} for r in history.rounds if r.refused
    ]
    missing = [{"site": r.site, "round": r.round} for r in history.rounds if r.missing]
    return {
        "job": history.job_name,
        "sites": history.sites,
        "rounds_planned": history.rounds_planned,
        "rounds_completed": history.rounds_completed,
        "stopped_reason": history.stopped_reason,
        "best_round": history.best_round,
        "privacy": spec.get("privacy"),
        "wall_time_s": None if wall_s is None else round(wall_s, 1),
        "per_site": per_site,
        "rounds": [record.__dict__ for record in history.rounds],
        "refusals": refusals,
        "missing": missing,
        "spec": spec,
    }


def _round_rows(records: list[SiteRound]) -> list[list[str]]:
    rows = []
    for r in sorted(records, key=lambda rec: (rec.round, rec.site)):
        status = "refused" if r.refused else "missing" if r.missing else "ok"
        rows.append(
            [
                str(r.round + 1),
                r.site,
                _num(r.val_dice),
                _num(r.train_loss),
                _num(r.epsilon, 2),
                _num(r.budget_left, 2),
                str(r.num_patients if r.num_patients is not None else "-"),
                str(r.num_steps if r.num_steps is not None else "-"),
                status,
            ]
        )
    return rows


_ROUND_HEADER = [
    "round",
    "site",
    "val Dice (received model)",
    "train loss",
    "epsilon so far",
    "site budget left",
    "train patients",
    "steps",
    "status",
]
_FINAL_HEADER = [
    "site",
    "Dice untrained",
    "Dice final global",
    "val patients",
    "epsilon",
    "delta",
    "site budget left",
]


def _final_rows(report: dict) -> list[list[str]]:
    return [
        [
            row["site"],
            _num(row["untrained_dice"]),
            _num(row["final_dice"]),
            str(row["val_patients"] if row["val_patients"] is not None else "-"),
            _num(row["epsilon"], 2),
            "-" if row["delta"] is None else f"{row['delta']:g}",
            _num(row["budget_left"], 2),
        ]
        for row in report["per_site"]
    ]


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _markdown(report: dict, history: RunHistory) -> str:
    privacy = report["privacy"] or {}
    if privacy.get("enabled"):
        noise = (
            f"noise multiplier {privacy['noise_multiplier']}"
            if privacy.get("noise_multiplier") is not None
            else f"target epsilon {privacy['target_epsilon']} for the whole job"
        )
        privacy_line = (
            f"DP-SGD per patient ({privacy['accountant'].upper()} accountant, {noise}, "
            f"clipping {privacy['max_grad_norm']}, delta {privacy['delta']:g}). Epsilon covers "
            "the model updates only; the validation metrics sites report are not DP."
        )
    else:
        privacy_line = "Differential privacy disabled: no privacy guarantee."
    weak = [row for row in report["per_site"] if (row["epsilon"] or 0) > WEAK_EPSILON]
    parts = [
        f"# fedseg report: {report['job']}",
        "",
        f"- sites: {', '.join(report['sites'])}",
        f"- rounds: {report['rounds_completed']} of {report['rounds_planned']} completed",
        f"- privacy: {privacy_line}",
    ]
    if report["wall_time_s"] is not None:
        parts.append(f"- wall time: {report['wall_time_s']} s")
    if weak:
        parts.append(
            f"- **weak privacy**: epsilon above {WEAK_EPSILON:g} at "
            f"{', '.join(row['site'] for row in weak)}; at that level the guarantee offers "
            "little formal protection (more patients per step, fewer parameters or fewer steps "
            "lower it)"
        )
    if report["stopped_reason"]:
        parts.append(f"- **stopped early**: {report['stopped_reason']}")
    if report["best_round"] is not None:
        parts.append(
            f"- best global model: after round {report['best_round']} (by mean validation Dice)"
        )
    parts += [
        "",
        "## Final global model, per site",
        "",
        _markdown_table(_FINAL_HEADER, _final_rows(report)),
        "",
        "## Per round",
        "",
        "Dice is measured at each site on its held-out patients, for the global model the site"
        " received at the start of the round (round 1 = the untrained model).",
        "",
        _markdown_table(_ROUND_HEADER, _round_rows(history.rounds)),
    ]
    if report["plots"]:
        parts += ["", "## Privacy spent per round", ""]
        parts += [f"![epsilon per round per site]({name})" for name in report["plots"]]
    if report["refusals"]:
        parts += ["", "## Refusals", ""]
        parts += [
            f"- round {r['round'] + 1}, {r['site']}: {r['reason']}" for r in report["refusals"]
        ]
    return "\n".join(parts) + "\n"


def write_report(
    history: RunHistory, *, spec: dict, out_dir: Path, wall_s: float | None = None
) -> dict:
    """Write report.json and report.md into ``out_dir``; return the report."""
    report = build_report(history, spec=spec, wall_s=wall_s)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_epsilon(history, out_dir / EPSILON_PLOT)
    report["plots"] = [plot.name] if plot else []
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(_markdown(report, history))
    return report


def final_table(report: dict) -> Table:
    table = Table(title=f"Final global model — {report['job']}")
    for column in _FINAL_HEADER:
        table.add_column(column, justify="left" if column == "site" else "right")
    for row in _final_rows(report):
        table.add_row(*row)
    return table
