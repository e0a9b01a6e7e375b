"""The site data summary: counts by reason, spacing ranges, lesion prevalence, the printed table."""

from __future__ import annotations

import numpy as np
import pytest
from rich.console import Console

from site_app.data_summary import SiteDataSummary, summarize, summary_table
from site_app.ingestion import IngestionResult
from site_app.quarantine import QuarantineEntry, QuarantineReason
from site_app.volumes import LabelledVolume, PatientRecord

R = QuarantineReason


def volume(key: str, lesion_voxels: int, spacing=(0.8, 0.8, 2.5)) -> LabelledVolume:
    """A 10 x 10 x 4 volume (400 voxels) with ``lesion_voxels`` lesion voxels."""
    label = np.zeros((10, 10, 4), dtype=np.uint8)
    label.reshape(-1)[:lesion_voxels] = 1
    return LabelledVolume(
        series_key=key,
        image_hu=np.zeros((10, 10, 4), dtype=np.float32),
        label=label,
        spacing_mm=spacing,
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        origin_mm=(0.0, 0.0, 0.0),
    )


def patient(key: str, *volumes: LabelledVolume, thickness: float | None) -> PatientRecord:
    return PatientRecord(key, volumes, "F", 50, "ACME", thickness)


def known_result() -> IngestionResult:
    return IngestionResult(
        patients=(
            patient(
                "p-a",
                volume("s-1", 40),
                volume("s-2", 0, spacing=(0.6, 0.7, 1.25)),
                thickness=1.25,
            ),
            patient("p-b", volume("s-3", 20, spacing=(0.9, 0.9, 5.0)), thickness=5.0),
        ),
        quarantine=(
            QuarantineEntry("x.txt", R.NOT_DICOM, "not DICOM"),
            QuarantineEntry("y.txt", R.NOT_DICOM, "not DICOM"),
            QuarantineEntry("gap", R.MISSING_SLICES, "gap", "s-4"),
            QuarantineEntry("plain", R.UNLABELLED_SERIES, "no SEG", "s-5"),
        ),
        files_seen=40,
        series_found=6,
        series_usable=3,
    )


def test_counts_ranges_and_prevalence_on_a_known_result():
    summary = summarize(known_result())

    assert (summary.files_seen, summary.series_found, summary.series_usable) == (40, 6, 3)
    assert summary.patients_usable == 2
    assert summary.quarantined_by_reason == {
        "not_dicom": 2,
        "missing_slices": 1,
        "unlabelled_series": 1,
    }
    assert summary.spacing_range_mm == ((0.6, 0.9), (0.7, 0.9), (1.25, 5.0))
    assert summary.slice_thickness_range_mm == (1.25, 5.0)
    assert summary.label_prevalence == pytest.approx(2 / 3)
    assert summary.lesion_voxel_fraction == pytest.approx((40 / 400 + 0 + 20 / 400) / 3)


def test_a_site_without_usable_data_has_no_ranges():
    result = IngestionResult(
        patients=(),
        quarantine=(QuarantineEntry("a", R.UNLABELLED_SERIES, "no SEG", "s-1"),),
        files_seen=8,
        series_found=1,
        series_usable=0,
    )
    summary = summarize(result)
    assert summary.patients_usable == 0
    assert summary.spacing_range_mm is None and summary.slice_thickness_range_mm is None
    assert summary.label_prevalence is None and summary.lesion_voxel_fraction is None
    assert "n/a" in render(summary)


def render(summary: SiteDataSummary) -> str:
    console = Console(record=True, width=120)
    console.print(summary_table(summary))
    return console.export_text()


def test_the_table_shows_the_key_rows():
    text = render(summarize(known_result()))
    lines = {line.strip("│ ").split("│")[0].strip(): line for line in text.splitlines()}

    for row, value in {
        "Files seen": "40",
        "Image series found": "6",
        "Usable labelled series": "3",
        "Patients with usable data": "2",
        "Slice spacing (mm)": "1.25 – 5.00",
        "Slice thickness (mm)": "1.25 – 5.00",
        "Volumes with a lesion": "66.7%",
        "Mean lesion voxel fraction": "5.000%",
        "Quarantined: not_dicom": "2",
        "Quarantined: missing_slices": "1",
        "Quarantined: unlabelled_series": "1",
    }.items():
        assert row in lines, f"row {row!r} missing from:\n{text}"
        assert value in lines[row]


def test_a_clean_site_says_nothing_was_quarantined():
    result = known_result()
    clean = IngestionResult(result.patients, (), result.files_seen, 2, 3)
    assert "Quarantined" in render(summarize(clean)) and "none" in render(summarize(clean))
