"""The model card: ``docs/model-card-template.md`` filled from a run's report into model_card.md.

Pure text from ``report.json`` data: intended use, data per site (counts only), metrics,
cross-site and subgroup results, the privacy guarantee as the code gives it, and limitations.
"""

from __future__ import annotations

import re
from pathlib import Path

from jobs.text_tables import format_number, markdown_table
from server_app.report_build import WEAK_EPSILON
from server_app.report_render import cross_site_table, subgroup_table
from server_app.report_schema import ModelSummary, Report

__all__ = ["DEFAULT_TEMPLATE", "ModelCardError", "fill_template", "model_card", "write_model_card"]

DEFAULT_TEMPLATE = Path(__file__).resolve().parent / "templates" / "model-card-template.md"
"""Installed with the package (``docs/model-card-template.md`` links here), so a non-editable
install fills the same template."""
_FIELD = re.compile(r"\{\{\s*([a-z_][a-z0-9_]*)\s*\}\}")


class ModelCardError(Exception):
    """The template cannot be filled; the message names the template and the field."""


def fill_template(template: str, values: dict[str, str], *, source: str = "template") -> str:
    """Replace every ``{{name}}`` with ``values[name]``; an unknown name is an error."""
    unknown = sorted({name for name in _FIELD.findall(template) if name not in values})
    if unknown:
        raise ModelCardError(
            f"{source}: unknown field(s) {unknown}; known fields: {sorted(values)} "
            "(fix the template or add the field in server_app/model_card.py)"
        )
    filled = _FIELD.sub(lambda match: values[match.group(1)], template)
    leftover = re.search(r"\{\{[^}]*\}\}", filled)
    if leftover:
        raise ModelCardError(
            f"{source}: {leftover.group(0)} is not a field name (lower case, digits, underscores)"
        )
    return filled


def _data_table(report: Report) -> str:
    rows = [
        [
            row.site,
            str(row.train_patients if row.train_patients is not None else "-"),
            str(row.val_patients if row.val_patients is not None else "-"),
            str(row.final_lesion_volumes if row.final_lesion_volumes is not None else "-"),
        ]
        for row in report.per_site
    ]
    header = ["site", "training patients", "held-out patients", "held-out volumes with a lesion"]
    return markdown_table(header, rows)


def _metrics_table(report: Report) -> str:
    rows = [
        [
            row.site,
            format_number(row.untrained_dice),
            format_number(row.final_dice),
            format_number(row.final_hd95_mm, 1),
            "-" if row.final_hd95_missing is None else str(row.final_hd95_missing),
        ]
        for row in report.per_site
    ]
    header = ["site", "Dice untrained", "Dice final", "HD95 mm final", "HD95 undefined"]
    return markdown_table(header, rows)


def _subgroup_summary(report: Report) -> str:
    subgroups = report.subgroups
    minimum = subgroups.min_cell_size
    lines = [
        f"Dice of the final model by patient group, per site and pooled ('Dice (n)', n = held-out"
        f" patients with a lesion). '<{minimum}' marks a group with fewer than {minimum} such"
        " patients at a site: the site never sent it."
    ]
    if subgroups.largest_gap:
        lines.append("")
        lines.append("Largest gap between groups (pooled Dice):")
        for gap in subgroups.largest_gap:
            best, worst = gap.best, gap.worst
            lines.append(
                f"- **{gap.attribute.replace('_', ' ')}**: {gap.gap:.3f} ({best.value} "
                f"{best.dice:.3f}, n={best.n}; {worst.value} {worst.dice:.3f}, "
                f"n={worst.n})"
            )
    else:
        lines.append("")
        lines.append(
            "**No attribute had two groups large enough to compare, so whether the model works "
            "equally for every group is not known from this run.**"
        )
    return "\n".join(lines)


def _privacy(report: Report) -> str:
    privacy = report.privacy or {}
    if not privacy.get("enabled"):
        return (
            "**None.** Differential privacy was disabled: the model updates the sites sent carry "
            "no formal guarantee, and the model may memorise training patients."
        )
    epsilon = ", ".join(
        f"{row.site} ε = {format_number(row.epsilon, 2)}" for row in report.per_site
    )
    lines = [
        f"Differential privacy per patient at each site (DP-SGD with Poisson sampling, per-patient"
        f" clipping {privacy.get('max_grad_norm')}, {str(privacy.get('accountant')).upper()}"
        f" accountant): ({epsilon}; δ = {privacy.get('delta'):g}). The guarantee covers the model"
        " updates a site sent over all rounds (and so this model, and every site's local model"
        " evaluated elsewhere), with respect to adding or removing one of that site's training"
        " patients.",
        "",
        "Not covered: what else sites send is exact, not DP: the number of training patients"
        " (the FedAvg weight), the mean training loss, and the validation metrics about held-out"
        " patients (Dice, HD95, subgroup cells). Small subgroups are suppressed, which limits but"
        " does not formally bound what they reveal.",
    ]
    weak = [row.site for row in report.per_site if (row.epsilon or 0) > WEAK_EPSILON]
    if weak:
        lines += [
            "",
            f"**Weak:** epsilon above {WEAK_EPSILON:g} at {', '.join(weak)} gives little formal "
            "protection.",
        ]
    seed = (report.spec.get("training") or {}).get("seed")
    simulated = report.model is not None and report.model.signer_kind == "simulation"
    if seed is not None and simulated:
        lines += [
            "",
            f"**Seeded noise (simulation, training.seed = {seed}):** the simulator seeds the DP"
            " noise so runs are reproducible; anyone who knows the seed can remove it, so for this"
            " run epsilon describes the mechanism, not a protection.",
        ]
    return "\n".join(lines)


def _limitations(report: Report) -> str:
    items = []
    model = report.model
    if model is None:
        items.append("The final model has no signed manifest: its origin cannot be verified.")
    elif model.signer_kind == "simulation":
        items.append(
            "This run was a simulation on one machine: the signature proves the file is "
            "unchanged, not which server made it."
        )
    if report.stopped_reason:
        items.append(f"Training stopped early: {report.stopped_reason}")
    if report.refusals:
        sites = sorted({r.site for r in report.refusals})
        items.append(
            f"Site(s) {', '.join(sites)} declined some rounds (privacy limits); their data "
            "shaped the model less."
        )
    no_dice = [row.site for row in report.per_site if row.final_dice is None]
    if no_dice:
        items.append(
            f"No held-out Dice at {', '.join(no_dice)} (no held-out lesion, or no answer): "
            "performance there is unknown."
        )
    small = [
        row.site
        for row in report.per_site
        if row.val_patients is not None and row.val_patients < 10
    ]
    if small:
        items.append(
            f"Fewer than 10 held-out patients at {', '.join(small)}: those sites' metrics rest "
            "on very few patients."
        )
    if not items:
        return "No run-specific limitation was detected; the general ones below still apply."
    return "\n".join(f"- {item}" for item in items)


def _signature(model: ModelSummary | None) -> str:
    if model is None:
        return "none (no manifest found beside the model)."
    if model.signer_kind == "simulation":
        return (
            "simulation key (self-signed, made for this run only): proves the file is unchanged "
            "since signing, not who signed it."
        )
    return f"signed by the federation's provisioned server ({model.signer_subject})."


def model_card(report: Report, template: str, *, source: str = "template") -> str:
    """The filled model card (Markdown) for ``report`` (``report_build.build_report``)."""
    spec = report.spec
    model_spec = spec.get("model") or {}
    data = spec.get("data") or {}
    model = report.model
    values = {
        "job": report.job,
        "network": (
            f"MONAI {str(model_spec.get('network', '?')).upper()} (channels "
            f"{', '.join(str(c) for c in model_spec.get('channels') or [])})"
        ),
        "spacing_mm": " x ".join(f"{s:g}" for s in data.get("target_spacing_mm") or []) or "?",
        "hu_window": f"{data.get('hu_window')} HU",
        "roi_size": " x ".join(str(s) for s in model_spec.get("roi_size") or []) or "?",
        "site_count": str(len(report.sites)),
        "rounds_completed": str(report.rounds_completed),
        "rounds_planned": str(report.rounds_planned),
        "model_file": model.file if model else "final_model.pt",
        "model_sha256": model.sha256 if model else "unknown (no manifest)",
        "signature": _signature(model),
        "fedseg_version": model.fedseg_version if model else "unknown",
        "created_utc": model.created_utc if model else "unknown",
        "data_table": _data_table(report),
        "metrics_table": _metrics_table(report),
        "cross_site_table": markdown_table(*cross_site_table(report)),
        "subgroup_summary": _subgroup_summary(report),
        "subgroup_table": markdown_table(*subgroup_table(report)),
        "privacy_guarantee": _privacy(report),
        "limitations": _limitations(report),
    }
    return fill_template(template, values, source=source)


def write_model_card(report: Report, path: Path, *, template_path: Path | None = None) -> Path:
    """Fill the template (default: the packaged one, ``docs/model-card-template.md``) and write
    it to ``path``."""
    template_path = Path(template_path or DEFAULT_TEMPLATE)
    if not template_path.is_file():
        raise ModelCardError(
            f"{template_path}: model card template not found; pass an existing Markdown file, "
            "or reinstall fedseg (the default template is part of the package)"
        )
    path.write_text(model_card(report, template_path.read_text(), source=str(template_path)))
    return path
