"""The run report as text for people: report.md, the tables the model card and the CLI show, and
the number formatting they share. Pure: a ``Report`` (``server_app.report_schema``) in, strings
(or a rich ``Table``) out."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from jobs import keys
from jobs.text_tables import format_number, markdown_table
from server_app.history import SiteRound
from server_app.report_build import WEAK_EPSILON
from server_app.report_schema import Report

__all__ = [
    "DICE_PLOT",
    "EPSILON_PLOT",
    "SUBGROUP_PLOT",
    "cross_site_table",
    "final_table",
    "format_number",
    "markdown_table",
    "report_markdown",
    "subgroup_table",
]

EPSILON_PLOT = "epsilon_per_round.png"
DICE_PLOT = "dice_per_round.png"
SUBGROUP_PLOT = "subgroup_dice.png"


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def _round_rows(records: list[SiteRound]) -> list[list[str]]:
    rows = []
    for r in sorted(records, key=lambda rec: (rec.round, rec.site)):
        status = "refused" if r.refused else "missing" if r.missing else "ok"
        rows.append(
            [
                str(r.round + 1),
                r.site,
                format_number(r.val_dice),
                format_number(r.val_hd95_mm, 1),
                format_number(r.train_loss),
                format_number(r.epsilon, 2),
                format_number(r.budget_left, 2),
                _count(r.num_patients),
                _count(r.num_steps),
                status,
            ]
        )
    return rows


_ROUND_HEADER = [
    "round",
    "site",
    "val Dice (received model)",
    "val HD95 mm",
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
    "HD95 mm final",
    "HD95 undefined",
    "val patients",
    "epsilon",
    "delta",
    "site budget left",
]


def _final_rows(report: Report) -> list[list[str]]:
    return [
        [
            row.site,
            format_number(row.untrained_dice),
            format_number(row.final_dice),
            format_number(row.final_hd95_mm, 1),
            _count(row.final_hd95_missing),
            _count(row.val_patients),
            format_number(row.epsilon, 2),
            "-" if row.delta is None else f"{row.delta:g}",
            format_number(row.budget_left, 2),
        ]
        for row in report.per_site
    ]


def _metric_pair(dice: float | None, hd95: float | None) -> str:
    return f"{format_number(dice)} / {format_number(hd95, 1)}"


def cross_site_table(report: Report) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the cross-site matrix: models (rows) x sites (columns),
    "Dice / HD95 mm" per cell."""
    cross = report.cross_site
    cells = {(c.model, c.site): c for c in cross.cells}
    header = ["model \\ evaluated at", *cross.sites]
    rows = []
    for model in cross.models:
        label = "final global" if model == keys.GLOBAL_MODEL else f"{model} local"
        row = [label]
        for site in cross.sites:
            cell = cells.get((model, site))
            if cell is None:
                row.append("-")
            elif cell.status != "ok":
                row.append(cell.status)
            else:
                row.append(_metric_pair(cell.dice, cell.hd95_mm))
        rows.append(row)
    return header, rows


def subgroup_table(report: Report) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the subgroup table: (attribute, value) x (each site, pooled), each
    cell "Dice (n)" or "<N" where the site did not send it."""
    subgroups = report.subgroups
    marker = f"<{subgroups.min_cell_size}"
    sites = report.sites
    sent = {(c.site, c.attribute, c.value): c for c in subgroups.per_site}
    pooled = {(c.attribute, c.value): c for c in subgroups.pooled}
    header = ["attribute", "value", *sites, "pooled Dice (n)", "pooled HD95 mm"]
    rows = []
    for attribute, values in subgroups.attributes.items():
        for value in values:
            row = [attribute.replace("_", " "), value]
            for site in sites:
                cell = sent.get((site, attribute, value))
                row.append(marker if cell is None else f"{format_number(cell.dice)} ({cell.n})")
            total = pooled.get((attribute, value))
            if total is None:
                row += [marker, "-"]
            else:
                row += [
                    f"{format_number(total.dice)} ({total.n})",
                    format_number(total.hd95_mm, 1),
                ]
            rows.append(row)
    return header, rows


def _privacy_line(privacy: dict) -> str:
    if privacy.get("enabled"):
        noise = (
            f"noise multiplier {privacy['noise_multiplier']}"
            if privacy.get("noise_multiplier") is not None
            else f"target epsilon {privacy['target_epsilon']} for the whole job"
        )
        return (
            f"DP-SGD per patient ({privacy['accountant'].upper()} accountant, {noise}, "
            f"clipping {privacy['max_grad_norm']}, delta {privacy['delta']:g}). Epsilon covers "
            "the model updates only; training-patient counts, training loss and the validation "
            "metrics sites report are exact, not DP."
        )
    return "Differential privacy disabled: no privacy guarantee."


def report_markdown(report: Report) -> str:
    """report.md."""
    privacy = report.privacy or {}
    weak = [row for row in report.per_site if (row.epsilon or 0) > WEAK_EPSILON]
    spacing_mm = (report.spec.get("data") or {}).get("target_spacing_mm") or []
    spacing = " x ".join(f"{value:g}" for value in spacing_mm) or "?"
    parts = [
        f"# fedseg report: {report.job}",
        "",
        f"- sites: {', '.join(report.sites)}",
        f"- rounds: {report.rounds_completed} of {report.rounds_planned} completed",
        f"- privacy: {_privacy_line(privacy)}",
    ]
    if report.wall_time_s is not None:
        parts.append(f"- wall time: {report.wall_time_s} s")
    if weak:
        parts.append(
            f"- **weak privacy**: epsilon above {WEAK_EPSILON:g} at "
            f"{', '.join(row.site for row in weak)}; at that level the guarantee offers "
            "little formal protection (more patients per step, fewer parameters or fewer steps "
            "lower it)"
        )
    if report.stopped_reason:
        parts.append(f"- **stopped early**: {report.stopped_reason}")
    if report.best_round is not None:
        parts.append(
            f"- best global model: after round {report.best_round} (by mean validation Dice)"
        )
    if report.model:
        model = report.model
        parts.append(
            f"- final model: {model.file} sha256 {model.sha256[:16]}…, signed "
            f"({model.signer_kind}: {model.signer_subject}); check it with "
            f"`fedseg model verify models/{model.file}`"
            + (
                ""
                if model.signer_kind == "simulation"
                else " --kit KIT (any kit of the federation)"
            )
        )
    parts += [
        "",
        "## Final global model, per site",
        "",
        "Dice: MONAI mean Dice over held-out volumes with a lesion (an empty prediction scores 0)."
        f" HD95: MONAI 95th-percentile Hausdorff distance in mm at the resampled spacing "
        f"{spacing} mm, averaged where defined; 'HD95 undefined' counts lesion volumes where the "
        "model predicted nothing (no distance exists; they are not averaged in as 0 or inf).",
        "",
        markdown_table(_FINAL_HEADER, _final_rows(report)),
        "",
        "## Cross-site evaluation",
        "",
        "Each model evaluated on each site's held-out patients (Dice / HD95 mm). 'final global'"
        " is the federated model; '<site> local' is that site's last local model (its update in"
        " the last round it contributed to), shared with other sites only with its consent.",
        "",
        markdown_table(*cross_site_table(report)),
    ]
    for site, reason in report.cross_site.not_shared.items():
        parts.append(f"\n- {site}'s local model not evaluated elsewhere: {reason}")
    parts += _subgroup_markdown(report)
    parts += [
        "",
        "## Per round",
        "",
        "Dice is measured at each site on its held-out patients, for the global model the site"
        " received at the start of the round (round 1 = the untrained model).",
        "",
        markdown_table(_ROUND_HEADER, _round_rows(report.rounds)),
    ]
    plots = set(report.plots)
    if DICE_PLOT in plots:
        parts += ["", f"![validation Dice per round per site]({DICE_PLOT})"]
    if EPSILON_PLOT in plots:
        parts += ["", "## Privacy spent per round", ""]
        parts.append(f"![epsilon per round per site]({EPSILON_PLOT})")
    if report.refusals:
        parts += ["", "## Refusals", ""]
        parts += [f"- round {r.round + 1}, {r.site}: {r.reason}" for r in report.refusals]
    return "\n".join(parts) + "\n"


def _subgroup_markdown(report: Report) -> list[str]:
    subgroups = report.subgroups
    minimum = subgroups.min_cell_size
    parts = [
        "",
        "## Subgroups (final global model)",
        "",
        f"Per site and pooled, 'Dice (n)' with n = held-out patients with a lesion. A site sends"
        f" a cell only with at least {minimum} such patients; '<{minimum}' means it had fewer (or"
        " none), and nothing about that cell left the site. Pooled values cover only the sites"
        " that sent the cell, weighted by n. Groups come from the DICOM headers (PatientSex,"
        " PatientAge, Manufacturer, SliceThickness).",
        "",
        markdown_table(*subgroup_table(report)),
        "",
    ]
    if subgroups.largest_gap:
        parts.append("Largest gap per attribute (pooled Dice, known values only):")
        parts.append("")
        for gap in subgroups.largest_gap:
            best, worst = gap.best, gap.worst
            parts.append(
                f"- {gap.attribute.replace('_', ' ')}: {gap.gap:.3f} — {best.value} "
                f"{best.dice:.3f} (n={best.n}) vs {worst.value} {worst.dice:.3f} "
                f"(n={worst.n})"
            )
    else:
        parts.append(
            "No attribute has two subgroups large enough to compare: no gap can be shown "
            f"(cells need {minimum} held-out patients with a lesion at a site)."
        )
    if SUBGROUP_PLOT in report.plots:
        parts += ["", f"![Dice by subgroup]({SUBGROUP_PLOT})"]
    return parts


def final_table(report: Report) -> Table:
    """The per-site table of the final global model, for the terminal."""
    table = Table(title=f"Final global model — {escape(str(report.job))}")
    for column in _FINAL_HEADER:
        table.add_column(column, justify="left" if column == "site" else "right")
    for row in _final_rows(report):
        table.add_row(*(escape(cell) for cell in row))  # site names and reasons are text
    return table
