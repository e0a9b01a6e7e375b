"""Writing the run report: report.json (schema: ``server_app.report_schema``), report.md, the PNG
plots and the model card into a results folder, from a RunHistory; ``rebuild_report`` makes them
again from saved results alone.

Building is ``server_app.report_build`` (pure), the text ``server_app.report_render``.
"""

from __future__ import annotations

import json
from pathlib import Path

from server_app.history import RunHistory, read_history
from server_app.model_card import write_model_card
from server_app.model_manifest import manifest_paths
from server_app.plots import plot_dice, plot_epsilon, plot_subgroups
from server_app.report_build import build_report
from server_app.report_render import DICE_PLOT, EPSILON_PLOT, SUBGROUP_PLOT, report_markdown
from server_app.report_schema import Report, ReportError

__all__ = ["MODEL_CARD", "rebuild_report", "write_report"]

MODEL_CARD = "model_card.md"


def _find_manifest(out_dir: Path) -> dict | None:
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
) -> Report:
    """Write report.json, report.md, the plots and model_card.md into ``out_dir``; return the
    report. The final model's manifest is read from ``out_dir/models`` (or ``out_dir``)."""
    out_dir = Path(out_dir)
    report = build_report(history, spec=spec, wall_s=wall_s, manifest=_find_manifest(out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = [
        plot_dice(history, out_dir / DICE_PLOT),
        plot_epsilon(history, out_dir / EPSILON_PLOT),
        plot_subgroups(report.subgroups, out_dir / SUBGROUP_PLOT),
    ]
    report.plots = [plot.name for plot in plots if plot]
    (out_dir / "report.json").write_text(json.dumps(report.to_json(), indent=2))
    (out_dir / "report.md").write_text(report_markdown(report))
    write_model_card(report, out_dir / MODEL_CARD)
    return report


def _read_report(path: Path) -> Report:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ReportError(
            f"{path}: not valid JSON ({error}); move it away to rebuild without it"
        ) from None
    return Report.from_json(data, source=str(path))


def rebuild_report(results_dir: Path) -> Report:
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
    previous = _read_report(previous_path) if previous_path.is_file() else None
    spec = history.spec or (previous.spec if previous else None)
    if spec is None:
        raise ReportError(
            f"{history_path} does not hold the job spec and there is no report.json beside it; "
            "the results come from an older fedseg, re-run the job"
        )
    wall_s = previous.wall_time_s if previous else None
    return write_report(history, spec=spec, out_dir=results_dir, wall_s=wall_s)
