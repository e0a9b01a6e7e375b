"""The run report: report.json (machine-readable), report.md (for people), PNG plots and the model
card, from a RunHistory. ``rebuild_report`` makes them again from saved results alone.

Only what the server received is reported: counts, metrics and epsilon per site, and subgroup
cells the sites chose to send; nothing patient-level exists at the server to leak.

report.json keys (other tools read these; keep them stable):

- ``job``, ``sites``, ``rounds_planned``, ``rounds_completed``, ``stopped_reason``,
  ``best_round`` (global model index with the best mean validation Dice, 0 = untrained),
  ``privacy`` (the spec's privacy section), ``wall_time_s``, ``spec`` (the whole spec).
- ``per_site``: one row per site: ``site``, ``train_patients``, ``val_patients``,
  ``untrained_dice``, ``final_dice``, ``final_hd95_mm`` (mean 95th-percentile Hausdorff distance,
  mm, at the job's ``data.target_spacing_mm``), ``final_hd95_missing`` (lesion volumes with an
  empty prediction, where HD95 is undefined and not averaged in), ``final_lesion_volumes``
  (volumes Dice is averaged over), ``epsilon`` (spent in this job, last report), ``delta``,
  ``budget_left``, ``accounting`` (DP jobs: ``accountant``, ``delta``, ``epsilon`` and
  ``mechanisms``, each ``mechanism``, ``noise_multiplier``, ``sample_rate``, ``steps`` in the
  order they ran: everything an independent accountant needs to recompute ``epsilon``).
- ``rounds``: every SiteRound as sent (``val_dice`` is for the model the site *received*).
- ``cross_site``: ``models`` (row order: ``"global"`` then sites), ``sites`` (columns),
  ``cells`` (``model``, ``model_round``, ``site``, ``dice``, ``hd95_mm``, ``hd95_missing``,
  ``val_patients``, ``status`` ok/refused/missing) and ``not_shared`` ({site: reason} for local
  models a site did not allow to be sent to other sites).
- ``subgroups``: ``min_cell_size``; ``attributes`` ({attribute: values shown}); ``per_site``
  (cells as sites sent them: ``site``, ``attribute``, ``value``, ``n``, ``dice``, ``hd95_mm``,
  ``n_hd95``); ``pooled`` (per ``attribute``/``value`` over the sites that sent the cell,
  weighted by ``n``; ``sites`` lists them); ``largest_gap`` (per attribute: ``best`` and
  ``worst`` pooled Dice among known values, ``gap`` = their difference). A cell a site did not
  send had fewer than ``min_cell_size`` patients there (or none).
- ``model``: the signed manifest's summary (``file``, ``sha256``, ``signer_kind``,
  ``signer_subject``, ``created_utc``, ``fedseg_version``, ``contributing_sites``) or None.
- ``refusals``, ``missing``: rounds a site declined or did not answer.
- ``plots``: PNG file names written beside report.json.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from jobs import keys
from server_app.history import RunHistory, SiteRound, read_history
from server_app.plots import plot_dice, plot_epsilon, plot_subgroups

__all__ = [
    "WEAK_EPSILON",
    "ReportError",
    "build_report",
    "cross_site_table",
    "final_table",
    "format_number",
    "largest_gaps",
    "markdown_table",
    "pool_subgroups",
    "rebuild_report",
    "subgroup_table",
    "write_report",
]

EPSILON_PLOT = "epsilon_per_round.png"
DICE_PLOT = "dice_per_round.png"
SUBGROUP_PLOT = "subgroup_dice.png"
WEAK_EPSILON = 10.0
"""Above this epsilon the report warns that the guarantee is weak (a common rule of thumb)."""
MODEL_CARD = "model_card.md"


class ReportError(Exception):
    """Saved results cannot be turned into a report; the message names the missing file."""


def format_number(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


# -- building (pure) ------------------------------------------------------------------------------


def site_accounting(records: list[SiteRound]) -> dict | None:
    """A site's DP mechanisms in this job, from what it sent (pure): the released patient count
    (one Gaussian step at rate 1, sent with its first answer) and DP-SGD (its noise and rate,
    steps summed over the rounds it trained). None when the site sent no DP answer."""
    dp = [r for r in sorted(records, key=lambda r: r.round) if r.noise_multiplier is not None]
    if not dp:
        return None
    first, last = dp[0], dp[-1]
    trained = [r for r in dp if not r.refused and not r.missing]
    mechanisms = [
        {
            "mechanism": "released patient count (Gaussian, sensitivity 1)",
            "noise_multiplier": first.count_noise_std,
            "sample_rate": 1.0,
            "steps": 1,
        }
    ]
    steps = sum(r.num_steps or 0 for r in trained)
    if steps:
        mechanisms.append(
            {
                "mechanism": "DP-SGD (Poisson-sampled Gaussian, per-patient clipping)",
                "noise_multiplier": first.noise_multiplier,
                "sample_rate": first.sample_rate,
                "steps": steps,
            }
        )
    epsilon = next((r.epsilon for r in reversed(dp) if r.epsilon is not None), None)
    return {
        "accountant": last.accountant,
        "delta": last.delta,
        "epsilon": epsilon,
        "mechanisms": mechanisms,
    }


def _cross_site(history: RunHistory) -> dict:
    cells = [
        {
            "model": keys.GLOBAL_MODEL,
            "model_round": history.rounds_completed,
            "site": r.site,
            "dice": r.val_dice,
            "hd95_mm": r.val_hd95_mm,
            "hd95_missing": r.val_hd95_missing,
            "val_patients": r.val_patients,
            "status": "refused" if r.refused else "missing" if r.missing else "ok",
        }
        for r in history.final
    ]
    cells += [
        {
            "model": c.model,
            "model_round": c.model_round,
            "site": c.site,
            "dice": c.val_dice,
            "hd95_mm": c.val_hd95_mm,
            "hd95_missing": c.val_hd95_missing,
            "val_patients": c.val_patients,
            "status": "refused" if c.refused else "missing" if c.missing else "ok",
        }
        for c in history.cross_site
    ]
    owners = sorted({c.model for c in history.cross_site})
    return {
        "models": [keys.GLOBAL_MODEL, *owners],
        "sites": history.sites,
        "cells": cells,
        "not_shared": dict(sorted(history.cross_site_not_shared.items())),
    }


def _weighted(cells: list[dict], value: str, weight: str) -> tuple[float | None, int]:
    pairs = [(c[value], c[weight]) for c in cells if c.get(value) is not None and c.get(weight)]
    total = sum(w for _, w in pairs)
    return (sum(v * w for v, w in pairs) / total if total else None), total


def pool_subgroups(per_site: list[dict]) -> list[dict]:
    """Cells pooled across sites per (attribute, value), weighted by each site's ``n``
    (``n_hd95`` for HD95). Only sites that sent the cell take part."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for cell in per_site:
        groups[(cell["attribute"], cell["value"])].append(cell)
    pooled = []
    for (attribute, value), cells in sorted(groups.items()):
        dice, n = _weighted(cells, "dice", "n")
        hd95, n_hd95 = _weighted(cells, "hd95_mm", "n_hd95")
        pooled.append(
            {
                "attribute": attribute,
                "value": value,
                "n": n,
                "sites": sorted(c["site"] for c in cells),
                "dice": dice,
                "hd95_mm": hd95,
                "n_hd95": n_hd95 or None,
            }
        )
    return pooled


def largest_gaps(pooled: list[dict]) -> list[dict]:
    """Per attribute, the best and worst pooled Dice among known values (``unknown`` excluded:
    it is not a group of patients) and their difference; attributes with fewer than two such
    cells have no gap."""
    by_attribute: dict[str, list[dict]] = defaultdict(list)
    for cell in pooled:
        if cell["value"] != keys.UNKNOWN and cell["dice"] is not None:
            by_attribute[cell["attribute"]].append(cell)
    gaps = []
    for attribute, cells in sorted(by_attribute.items()):
        if len(cells) < 2:
            continue
        best = max(cells, key=lambda c: (c["dice"], c["value"]))
        worst = min(cells, key=lambda c: (c["dice"], c["value"]))
        gaps.append(
            {
                "attribute": attribute,
                "metric": "dice",
                "best": {k: best[k] for k in ("value", "dice", "hd95_mm", "n")},
                "worst": {k: worst[k] for k in ("value", "dice", "hd95_mm", "n")},
                "gap": best["dice"] - worst["dice"],
            }
        )
    return gaps


def _subgroups(history: RunHistory, spec: dict) -> dict:
    per_site = []
    for record in sorted(history.final, key=lambda r: r.site):
        for cell in record.subgroups or []:
            per_site.append(
                {
                    "site": record.site,
                    "attribute": cell[keys.CELL_ATTRIBUTE],
                    "value": cell[keys.CELL_VALUE],
                    "n": cell[keys.CELL_PATIENTS],
                    "dice": cell[keys.CELL_DICE],
                    "hd95_mm": cell[keys.CELL_HD95_MM],
                    "n_hd95": cell[keys.CELL_HD95_PATIENTS],
                }
            )
    seen: dict[str, set[str]] = defaultdict(set)
    for cell in per_site:
        seen[cell["attribute"]].add(cell["value"])
    attributes = {}
    for attribute, fixed in keys.SUBGROUP_VALUES.items():
        known = [v for v in fixed if v != keys.UNKNOWN]
        extra = sorted(seen[attribute] - set(known) - {keys.UNKNOWN})
        unknown = [keys.UNKNOWN] if keys.UNKNOWN in seen[attribute] else []
        attributes[attribute] = known + extra + unknown
    pooled = pool_subgroups(per_site)
    minimum = (spec.get("evaluation") or {}).get("min_subgroup_size", 5)
    return {
        "min_cell_size": minimum,
        "attributes": attributes,
        "per_site": per_site,
        "pooled": pooled,
        "largest_gap": largest_gaps(pooled),
    }


def build_report(
    history: RunHistory,
    *,
    spec: dict,
    wall_s: float | None = None,
    manifest: dict | None = None,
) -> dict:
    """Everything a researcher needs from one run, as plain data (keys: module docstring)."""
    privacy = spec.get("privacy") or {}
    untrained = {r.site: r.val_dice for r in history.rounds if r.round == 0}
    final = {r.site: r for r in history.final}
    last_epsilon: dict[str, float | None] = {}
    budget_left: dict[str, float | None] = {}
    train_patients: dict[str, int] = {}
    for record in sorted(history.rounds, key=lambda r: r.round):
        if record.epsilon is not None:
            last_epsilon[record.site] = record.epsilon
        if record.budget_left is not None:
            budget_left[record.site] = record.budget_left
        if record.num_patients is not None:
            train_patients[record.site] = record.num_patients
    per_site = []
    for site in history.sites:
        final_record = final.get(site)
        per_site.append(
            {
                "site": site,
                "train_patients": train_patients.get(site),
                "val_patients": final_record.val_patients if final_record else None,
                "untrained_dice": untrained.get(site),
                "final_dice": final_record.val_dice if final_record else None,
                "final_hd95_mm": final_record.val_hd95_mm if final_record else None,
                "final_hd95_missing": final_record.val_hd95_missing if final_record else None,
                "final_lesion_volumes": final_record.val_lesion_volumes if final_record else None,
                "epsilon": last_epsilon.get(site),
                "budget_left": budget_left.get(site),
                "delta": privacy.get("delta") if privacy.get("enabled") else None,
                "accounting": site_accounting([r for r in history.rounds if r.site == site]),
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
        "cross_site": _cross_site(history),
        "subgroups": _subgroups(history, spec),
        "model": _model_summary(manifest),
        "refusals": refusals,
        "missing": missing,
        "spec": spec,
    }


def _model_summary(manifest: dict | None) -> dict | None:
    if not manifest:
        return None
    signer = manifest.get("signer") or {}
    return {
        "file": manifest.get("model_file"),
        "sha256": manifest.get("model_sha256"),
        "signer_kind": signer.get("kind"),
        "signer_subject": signer.get("subject"),
        "created_utc": manifest.get("created_utc"),
        "fedseg_version": manifest.get("fedseg_version"),
        "contributing_sites": manifest.get("contributing_sites"),
    }


# -- markdown -------------------------------------------------------------------------------------


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


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def _final_rows(report: dict) -> list[list[str]]:
    return [
        [
            row["site"],
            format_number(row["untrained_dice"]),
            format_number(row["final_dice"]),
            format_number(row["final_hd95_mm"], 1),
            _count(row["final_hd95_missing"]),
            _count(row["val_patients"]),
            format_number(row["epsilon"], 2),
            "-" if row["delta"] is None else f"{row['delta']:g}",
            format_number(row["budget_left"], 2),
        ]
        for row in report["per_site"]
    ]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _metric_pair(dice: float | None, hd95: float | None) -> str:
    return f"{format_number(dice)} / {format_number(hd95, 1)}"


def cross_site_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the cross-site matrix: models (rows) x sites (columns),
    "Dice / HD95 mm" per cell."""
    cross = report["cross_site"]
    cells = {(c["model"], c["site"]): c for c in cross["cells"]}
    header = ["model \\ evaluated at", *cross["sites"]]
    rows = []
    for model in cross["models"]:
        label = "final global" if model == keys.GLOBAL_MODEL else f"{model} local"
        row = [label]
        for site in cross["sites"]:
            cell = cells.get((model, site))
            if cell is None:
                row.append("-")
            elif cell["status"] != "ok":
                row.append(cell["status"])
            else:
                row.append(_metric_pair(cell["dice"], cell["hd95_mm"]))
        rows.append(row)
    return header, rows


def subgroup_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the subgroup table: (attribute, value) x (each site, pooled), each
    cell "Dice (n)" or "<N" where the site did not send it."""
    subgroups = report["subgroups"]
    marker = f"<{subgroups['min_cell_size']}"
    sites = report["sites"]
    sent = {(c["site"], c["attribute"], c["value"]): c for c in subgroups["per_site"]}
    pooled = {(c["attribute"], c["value"]): c for c in subgroups["pooled"]}
    header = ["attribute", "value", *sites, "pooled Dice (n)", "pooled HD95 mm"]
    rows = []
    for attribute, values in subgroups["attributes"].items():
        for value in values:
            row = [attribute.replace("_", " "), value]
            for site in sites:
                cell = sent.get((site, attribute, value))
                row.append(
                    marker if cell is None else f"{format_number(cell['dice'])} ({cell['n']})"
                )
            total = pooled.get((attribute, value))
            if total is None:
                row += [marker, "-"]
            else:
                row += [
                    f"{format_number(total['dice'])} ({total['n']})",
                    format_number(total["hd95_mm"], 1),
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


def _markdown(report: dict, history: RunHistory) -> str:
    privacy = report["privacy"] or {}
    weak = [row for row in report["per_site"] if (row["epsilon"] or 0) > WEAK_EPSILON]
    spacing_mm = (report["spec"].get("data") or {}).get("target_spacing_mm") or []
    spacing = " x ".join(f"{value:g}" for value in spacing_mm) or "?"
    parts = [
        f"# fedseg report: {report['job']}",
        "",
        f"- sites: {', '.join(report['sites'])}",
        f"- rounds: {report['rounds_completed']} of {report['rounds_planned']} completed",
        f"- privacy: {_privacy_line(privacy)}",
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
    if report["model"]:
        model = report["model"]
        parts.append(
            f"- final model: {model['file']} sha256 {model['sha256'][:16]}…, signed "
            f"({model['signer_kind']}: {model['signer_subject']}); check it with "
            f"`fedseg model verify models/{model['file']}`"
            + (
                ""
                if model["signer_kind"] == "simulation"
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
    for site, reason in report["cross_site"]["not_shared"].items():
        parts.append(f"\n- {site}'s local model not evaluated elsewhere: {reason}")
    parts += _subgroup_markdown(report)
    parts += [
        "",
        "## Per round",
        "",
        "Dice is measured at each site on its held-out patients, for the global model the site"
        " received at the start of the round (round 1 = the untrained model).",
        "",
        markdown_table(_ROUND_HEADER, _round_rows(history.rounds)),
    ]
    plots = set(report["plots"])
    if DICE_PLOT in plots:
        parts += ["", f"![validation Dice per round per site]({DICE_PLOT})"]
    if EPSILON_PLOT in plots:
        parts += ["", "## Privacy spent per round", ""]
        parts.append(f"![epsilon per round per site]({EPSILON_PLOT})")
    if report["refusals"]:
        parts += ["", "## Refusals", ""]
        parts += [
            f"- round {r['round'] + 1}, {r['site']}: {r['reason']}" for r in report["refusals"]
        ]
    return "\n".join(parts) + "\n"


def _subgroup_markdown(report: dict) -> list[str]:
    subgroups = report["subgroups"]
    minimum = subgroups["min_cell_size"]
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
    if subgroups["largest_gap"]:
        parts.append("Largest gap per attribute (pooled Dice, known values only):")
        parts.append("")
        for gap in subgroups["largest_gap"]:
            best, worst = gap["best"], gap["worst"]
            parts.append(
                f"- {gap['attribute'].replace('_', ' ')}: {gap['gap']:.3f} — {best['value']} "
                f"{best['dice']:.3f} (n={best['n']}) vs {worst['value']} {worst['dice']:.3f} "
                f"(n={worst['n']})"
            )
    else:
        parts.append(
            "No attribute has two subgroups large enough to compare: no gap can be shown "
            f"(cells need {minimum} held-out patients with a lesion at a site)."
        )
    if SUBGROUP_PLOT in report["plots"]:
        parts += ["", f"![Dice by subgroup]({SUBGROUP_PLOT})"]
    return parts


# -- writing --------------------------------------------------------------------------------------


def _find_manifest(out_dir: Path) -> dict | None:
    from server_app.model_manifest import manifest_paths

    for folder in (out_dir / "models", out_dir):
        manifest_path, _ = manifest_paths(folder / "final_model.pt")
        if manifest_path.is_file():
            try:
                return json.loads(manifest_path.read_text())
            except ValueError:
                return None  # a damaged manifest: `fedseg model verify` says what is wrong
    return None


def write_report(
    history: RunHistory, *, spec: dict, out_dir: Path, wall_s: float | None = None
) -> dict:
    """Write report.json, report.md, the plots and model_card.md into ``out_dir``; return the
    report. The final model's manifest is read from ``out_dir/models`` (or ``out_dir``)."""
    from server_app.model_card import write_model_card

    out_dir = Path(out_dir)
    report = build_report(history, spec=spec, wall_s=wall_s, manifest=_find_manifest(out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = [
        plot_dice(history, out_dir / DICE_PLOT),
        plot_epsilon(history, out_dir / EPSILON_PLOT),
        plot_subgroups(report["subgroups"], out_dir / SUBGROUP_PLOT),
    ]
    report["plots"] = [plot.name for plot in plots if plot]
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(_markdown(report, history))
    write_model_card(report, out_dir / MODEL_CARD)
    return report


def rebuild_report(results_dir: Path) -> dict:
    """Rebuild report.json, report.md, the plots and the model card in ``results_dir`` from its
    saved ``history.json`` (spec inside it), without running anything.

    The wall time, which only the simulator measured, is kept from an existing report.json.
    """
    results_dir = Path(results_dir)
    history_path = results_dir / "history.json"
    if not history_path.is_file():
        raise ReportError(
            f"{history_path} not found; give the results folder of a run (the one holding "
            "history.json, e.g. the --out folder of `fedseg simulate run`)"
        )
    history = read_history(history_path)
    previous_path = results_dir / "report.json"
    previous = json.loads(previous_path.read_text()) if previous_path.is_file() else {}
    spec = history.spec or previous.get("spec")
    if spec is None:
        raise ReportError(
            f"{history_path} does not hold the job spec and there is no report.json beside it; "
            "the results come from an older fedseg, re-run the job"
        )
    return write_report(history, spec=spec, out_dir=results_dir, wall_s=previous.get("wall_time_s"))


def final_table(report: dict) -> Table:
    table = Table(title=f"Final global model — {escape(str(report['job']))}")
    for column in _FINAL_HEADER:
        table.add_column(column, justify="left" if column == "site" else "right")
    for row in _final_rows(report):
        table.add_row(*(escape(cell) for cell in row))  # site names and reasons are text
    return table
