"""The numbers `fedseg site check --data DIR` prints about a site's data, and their rich table.

Only counts, ranges and shares: no paths, keys, names, IDs or dates, so the table may be shown
or pasted anywhere.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from rich.markup import escape
from rich.table import Table

from site_app.ingestion import IngestionResult
from site_app.quarantine import QuarantineReason

Range = tuple[float, float]


@dataclass(frozen=True)
class SiteDataSummary:
    """Aggregate view of one `IngestionResult`.

    ``quarantined_by_reason`` maps `QuarantineReason` values to entry counts (reasons with no
    entry are left out; order follows `QuarantineReason`). ``spacing_range_mm`` is (min, max) in
    mm for row spacing, column spacing and slice spacing over usable volumes;
    ``slice_thickness_range_mm`` is (min, max) of SliceThickness over usable patients (first
    volume of each). ``label_prevalence`` is the share of usable volumes with at least one lesion
    voxel and ``lesion_voxel_fraction`` the mean over volumes of lesion voxels / all voxels, both
    in [0, 1]. Ranges and shares are None when there is no usable volume.
    """

    files_seen: int
    series_found: int
    series_usable: int
    patients_usable: int
    quarantined_by_reason: dict[str, int]
    spacing_range_mm: tuple[Range, Range, Range] | None
    slice_thickness_range_mm: Range | None
    label_prevalence: float | None
    lesion_voxel_fraction: float | None


def summarize(result: IngestionResult) -> SiteDataSummary:
    """Count and measure what `ingest_site` returned (pure; no I/O)."""
    volumes = [volume for patient in result.patients for volume in patient.volumes]
    counts = Counter(entry.reason for entry in result.quarantine)
    spacings = np.array([volume.spacing_mm for volume in volumes]).reshape(-1, 3)
    thicknesses = [p.slice_thickness_mm for p in result.patients if p.slice_thickness_mm]
    has_lesion = [bool(volume.label.any()) for volume in volumes]
    lesion_fractions = [float(np.count_nonzero(v.label)) / v.label.size for v in volumes]
    return SiteDataSummary(
        files_seen=result.files_seen,
        series_found=result.series_found,
        series_usable=result.series_usable,
        patients_usable=sum(1 for p in result.patients if p.volumes),
        quarantined_by_reason={r.value: counts[r] for r in QuarantineReason if counts[r]},
        spacing_range_mm=(
            tuple(  # type: ignore[arg-type]
                (float(spacings[:, axis].min()), float(spacings[:, axis].max()))
                for axis in range(3)
            )
            if volumes
            else None
        ),
        slice_thickness_range_mm=(min(thicknesses), max(thicknesses)) if thicknesses else None,
        label_prevalence=float(np.mean(has_lesion)) if volumes else None,
        lesion_voxel_fraction=float(np.mean(lesion_fractions)) if volumes else None,
    )


def _range(values: Range | None) -> str:
    if values is None:
        return "n/a"
    low, high = values
    return f"{low:.2f}" if low == high else f"{low:.2f} – {high:.2f}"


def _share(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}%}"


def summary_table(summary: SiteDataSummary) -> Table:
    """A two-column table (item, value) of ``summary`` for the terminal."""
    table = Table(title="Site data", show_header=True, header_style="bold")
    table.add_column("Item")
    table.add_column("Value", justify="right")
    table.add_row("Files seen", str(summary.files_seen))
    table.add_row("Image series found", str(summary.series_found))
    table.add_row("Usable labelled series", str(summary.series_usable))
    table.add_row("Patients with usable data", str(summary.patients_usable))
    axes = ("Row spacing (mm)", "Column spacing (mm)", "Slice spacing (mm)")
    for axis, name in enumerate(axes):
        spacing = summary.spacing_range_mm
        table.add_row(name, _range(spacing[axis] if spacing else None))
    table.add_row("Slice thickness (mm)", _range(summary.slice_thickness_range_mm))
    table.add_row("Volumes with a lesion", _share(summary.label_prevalence))
    table.add_row("Mean lesion voxel fraction", _share(summary.lesion_voxel_fraction, 3))
    if not summary.quarantined_by_reason:
        table.add_row("Quarantined", "none")
    for reason, count in summary.quarantined_by_reason.items():
        table.add_row(f"Quarantined: {escape(str(reason))}", str(count))
    return table
