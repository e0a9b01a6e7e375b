"""``fedseg site drift``: parsing, printing and the plot only.

The fingerprint is ``site_app.fingerprint``'s (written by each job at the site), the comparison
``site_app.drift``'s. Exit status: 0 when no feature passes its threshold, 1 when one does,
2 for a usage or input error.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from rich.markup import escape
from rich.table import Table

from fedseg.terminal import UserError, console, print_table

if TYPE_CHECKING:  # imported lazily, so `fedseg --help` stays fast
    from site_app.drift import DriftReport, FeatureDrift


_PNG_METADATA = {"Software": None}  # the bytes do not depend on the matplotlib version


# -- arguments -----------------------------------------------------------------------------------


def _threshold_names() -> tuple[str, ...]:
    from site_app.drift import DriftThresholds

    return tuple(f.name for f in dataclasses.fields(DriftThresholds))


def _threshold(text: str) -> tuple[str, float]:
    """``NAME=VALUE`` of one `site_app.drift.DriftThresholds` field."""
    names = _threshold_names()
    name, sep, value = text.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or name not in names:
        raise argparse.ArgumentTypeError(
            f"expected NAME=VALUE with NAME one of {', '.join(names)}, got {text!r}"
        )
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: expected a number, got {value!r}") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{name}: expected a number > 0, got {value!r}")
    return name, number


# -- resolving what to compare -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Sources:
    fingerprint: Path
    data_dir: Path
    cache_dir: Path | None


def _sources(args: argparse.Namespace, user_error: type[Exception]) -> _Sources:
    from site_app.fingerprint import fingerprint_path, job_fingerprints
    from site_app.site_config import SITE_CONFIG_FILE, load_site_config, site_private_dir

    private, data, cache = None, args.data, args.cache
    if args.kit:
        kit = Path(args.kit)
        config = load_site_config(kit / "local" / SITE_CONFIG_FILE)
        private = site_private_dir(config, kit)
        data = data or config.data_dir
        # The site's own cache, as its jobs use it: unchanged files are not decoded again.
        cache = cache or config.cache_dir or private / "cache"
    elif args.private_dir:
        private = Path(args.private_dir)
    if data is None:
        raise user_error("pass --data DIR (the DICOM folder to check), or --kit KIT for its own")

    if args.fingerprint:
        fingerprint = Path(args.fingerprint)
    elif private is None:
        raise user_error(
            "say what to compare with: --fingerprint FILE, or --kit KIT / --private-dir DIR "
            "(with --job JOB, or for the newest job)"
        )
    else:
        known = job_fingerprints(private)
        if args.job:
            if Path(args.job).name != args.job or args.job in (".", ".."):
                raise user_error(f"--job: expected a job name or id, got {args.job!r}")
            fingerprint = fingerprint_path(private, args.job)
            if not fingerprint.is_file():
                jobs = ", ".join(p.parent.name for p in known) or "none"
                raise user_error(
                    f"no fingerprint of job {args.job!r} in {private} (jobs with one: {jobs}); "
                    "a job writes it when it starts at this site"
                )
        elif known:
            fingerprint = known[-1]
        else:
            raise user_error(
                f"no job fingerprint in {private}; a job writes one when it starts at this "
                "site (or pass --fingerprint FILE)"
            )
    return _Sources(
        fingerprint=fingerprint,
        data_dir=Path(data),
        cache_dir=Path(cache) if cache else None,
    )


# -- printing ------------------------------------------------------------------------------------


def _value_text(drift: FeatureDrift, value: float) -> str:
    from site_app.drift import Feature

    if drift.feature is Feature.HU_SHIFT:
        return f"{value:+.0f} HU"
    if drift.feature in (Feature.HU_PSI, Feature.VENDOR_MIX, Feature.SLICE_THICKNESS_MIX):
        return f"{value:.2f}"
    if drift.feature is Feature.LESION_PREVALENCE:
        return f"{value:+.2f}"
    return f"{value:+.0%}"


def _threshold_text(drift: FeatureDrift) -> str:
    text = _value_text(drift, drift.threshold).lstrip("+")
    signed = {"hu_shift", "in_plane_spacing", "slice_spacing", "lesion_prevalence"}
    return ("±" if drift.feature.value in signed or text.endswith("%") else "") + text


def drift_table(report: DriftReport) -> Table:
    """The verdict per feature: reference (the job's data), current, measure, value, threshold."""
    reference, current = report.reference, report.current
    table = Table(
        title=(
            f"Drift of the current data ({current.series} series, {current.patients} patients) "
            f"against job {escape(reference.job)} ({reference.series} series, "
            f"{reference.patients} patients)"
        ),
        header_style="bold",
    )
    for name, justify in (
        ("Feature", "left"),
        ("Job's data", "left"),
        ("Current data", "left"),
        ("Measure", "left"),
        ("Value", "right"),
        ("Threshold", "right"),
        ("Verdict", "left"),
        ("Note", "left"),
    ):
        table.add_column(name, justify=justify)
    for drift in report.features:
        if drift.value is None:
            verdict = "[dim]n/a[/dim]"
        else:
            verdict = "[red]drift[/red]" if drift.flagged else "[green]ok[/green]"
        table.add_row(
            drift.feature.value,
            escape(drift.reference),
            escape(drift.current),
            drift.measure,
            "n/a" if drift.value is None else _value_text(drift, drift.value),
            _threshold_text(drift),
            verdict,
            escape(drift.note),
        )
    return table


# -- the plot ------------------------------------------------------------------------------------


def _mix_bars(axes, title: str, reference: dict[str, float], current: dict[str, float]) -> None:
    import numpy as np

    names = sorted(set(reference) | set(current))
    x = np.arange(len(names))
    axes.bar(x - 0.2, [reference.get(n, 0.0) for n in names], 0.4, label="job's data")
    axes.bar(x + 0.2, [current.get(n, 0.0) for n in names], 0.4, label="current")
    axes.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    axes.set_ylim(0, 1)
    axes.set_ylabel("share of patients")
    axes.set_title(title)
    axes.legend(fontsize=8)


def plot_drift(report: DriftReport, path: Path) -> Path:
    """A PNG of the comparison: HU histograms and percentile shifts, vendor and thickness mixes,
    spacing medians, and each feature's value as a multiple of its threshold."""
    import numpy as np
    from matplotlib.figure import Figure

    from site_app.drift import Feature, hu_quantile_shifts
    from site_app.fingerprint import HISTOGRAM_BIN_HU, histogram_edges_hu

    reference, current = report.reference, report.current
    figure = Figure(figsize=(15, 8), dpi=100)
    (hist, shifts, verdict), (vendors, thickness, spacing) = figure.subplots(2, 3)
    by_feature = {drift.feature: drift for drift in report.features}

    if reference.hu is not None and current.hu is not None:
        for profile, label in ((reference.hu, "job's data"), (current.hu, "current")):
            shares = np.asarray(profile.histogram_shares)
            edges = histogram_edges_hu(shares.size)
            hist.step(edges + HISTOGRAM_BIN_HU / 2, shares, where="mid", label=label)
        hist.legend(fontsize=8)
        levels = hu_quantile_shifts(reference.hu, current.hu)
        limit = by_feature[Feature.HU_SHIFT].threshold
        colours = ["tab:red" if abs(v) > limit else "tab:blue" for v in levels.values()]
        shifts.bar([f"p{level}" for level in levels], list(levels.values()), color=colours)
        for sign in (1, -1):
            shifts.axhline(sign * limit, color="tab:red", linestyle="--", linewidth=1)
        shifts.axhline(0, color="black", linewidth=0.5)
    hist.set_xlabel("HU (body voxels, > -500 HU)")
    hist.set_ylabel("share of body voxels")
    hist.set_title("HU histogram")
    shifts.set_ylabel("current - job's data (HU)")
    shifts.set_title("HU percentile shift (dashed: threshold)")

    judged = [d for d in report.features if d.value is not None]
    ratios = [abs(d.value) / d.threshold for d in judged]
    verdict.barh(
        [d.feature.value for d in judged],
        ratios,
        color=["tab:red" if d.flagged else "tab:green" for d in judged],
    )
    verdict.axvline(1.0, color="black", linestyle="--", linewidth=1)
    verdict.invert_yaxis()
    verdict.tick_params(axis="y", labelsize=8)
    verdict.set_xlabel("|value| / threshold (right of the line: drift)")
    verdict.set_title("Verdict per feature")

    _mix_bars(vendors, "Vendor mix", reference.vendor_mix, current.vendor_mix)
    _mix_bars(
        thickness, "Slice thickness mix", reference.slice_thickness_mix, current.slice_thickness_mix
    )
    names = ("in-plane", "slice")
    x = np.arange(len(names))
    for offset, fingerprint, label in ((-0.2, reference, "job's data"), (0.2, current, "current")):
        medians = [fingerprint.in_plane_spacing_mm["50"], fingerprint.slice_spacing_mm["50"]]
        spacing.bar(x + offset, medians, 0.4, label=label)
    spacing.set_xticks(x, names)
    spacing.set_ylabel("median spacing (mm)")
    spacing.set_title("Spacing")
    spacing.legend(fontsize=8)

    figure.suptitle(f"fedseg site drift: current data against job {reference.job}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, metadata=_PNG_METADATA)
    return path


# -- the command ---------------------------------------------------------------------------------


def _site_drift(args: argparse.Namespace) -> int:
    from site_app.drift import DriftThresholds, compare_fingerprints
    from site_app.fingerprint import FingerprintError, fingerprint_of, read_fingerprint
    from site_app.ingestion import ingest_site

    sources = _sources(args, UserError)
    try:
        reference = read_fingerprint(sources.fingerprint)
    except FingerprintError as error:
        raise UserError(str(error)) from None
    thresholds = DriftThresholds(**dict(args.threshold))
    try:
        result = ingest_site(sources.data_dir, cache_dir=sources.cache_dir, progress=True)
        current = fingerprint_of(result, job="current")
    except (ValueError, FingerprintError) as error:
        raise UserError(f"{sources.data_dir}: {error}") from None
    report = compare_fingerprints(reference, current, thresholds)

    console.print(f"job's data: {sources.fingerprint}", markup=False, highlight=False)
    console.print(
        f"current data: {sources.data_dir} ({len(result.quarantine)} quarantined item(s), "
        "left out as in training; `fedseg site check --data DIR` lists them)",
        markup=False,
        highlight=False,
    )
    print_table(drift_table(report))
    if args.plot:
        plot = plot_drift(report, Path(args.plot))
        console.print(f"plot: {plot}", markup=False, highlight=False)
    if report.drifted:
        names = ", ".join(d.feature.value for d in report.drifted)
        console.print(
            f"[red]drift[/red]: {escape(names)} moved past the threshold; check the scanner, "
            "protocol or export before the next job (and validate the current model on this data)"
        )
        return 1
    console.print("[green]no drift[/green]: every feature is within its threshold")
    return 0


def register(site_commands: argparse._SubParsersAction) -> None:
    """Add ``site drift`` to the ``fedseg site`` command group."""
    drift = site_commands.add_parser(
        "drift",
        help="compare the site's current data with what a job trained on (exit 1 on drift)",
        description="Ingest --data as training does and compare it, feature by feature, with "
        "the fingerprint a job wrote at this site (<private_dir>/<job>/fingerprint.json). "
        "Exit status 0: no drift; 1: a feature passed its threshold; 2: an error.",
    )
    drift.add_argument(
        "--data", metavar="DIR", help="the DICOM folder to check (default with --kit: its data_dir)"
    )
    which = drift.add_mutually_exclusive_group()
    which.add_argument(
        "--job", metavar="JOB", help="the job (its FLARE job id) to compare with (default: newest)"
    )
    which.add_argument("--fingerprint", metavar="FILE", help="a fingerprint file to compare with")
    where = drift.add_mutually_exclusive_group()
    where.add_argument(
        "--kit",
        metavar="KIT",
        help="the site's startup kit: its local/fedseg_site.yaml gives private_dir, data and cache",
    )
    where.add_argument(
        "--private-dir", metavar="DIR", help="the site's private folder holding the fingerprints"
    )
    drift.add_argument("--cache", metavar="DIR", help="cache folder for decoded volumes (optional)")
    drift.add_argument("--plot", metavar="PNG", help="also draw the comparison into this PNG")
    drift.add_argument(
        "--threshold",
        action="append",
        default=[],
        type=_threshold,
        metavar="NAME=VALUE",
        help="change one threshold (repeatable): NAME as in the table's Feature column, e.g. "
        "hu_shift=30 (units and defaults: docs/site-admin.md)",
    )
    drift.set_defaults(handler=_site_drift)
