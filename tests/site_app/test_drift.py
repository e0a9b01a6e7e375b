"""Drift watch: a job's data fingerprint, and ``fedseg site drift`` against data that moved.

The moved data is a copy of a simulated site with its CT headers rewritten (an HU calibration
offset through RescaleIntercept, another Manufacturer), or another simulated site's data.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.errors import InvalidDicomError

from fedseg.cli import main
from simulator.dicom_writer import PatientIdentity
from site_app.drift import (
    DriftThresholds,
    Feature,
    compare_fingerprints,
    population_stability_index,
    total_variation,
)
from site_app.fingerprint import (
    DataFingerprint,
    FingerprintError,
    fingerprint_of,
    fingerprint_path,
    read_fingerprint,
    write_fingerprint,
)
from site_app.ingestion import ingest_site
from site_app.local_job import LocalJob
from site_app.policy import PrivacyPolicy
from site_app.site_config import SiteConfig
from tests.conftest import tiny_spec
from tests.test_phi import leaks_in, needles

SITE = "site-1"


def _headers(folder: Path) -> list[tuple[Path, pydicom.Dataset]]:
    """Every DICOM file under ``folder`` with its dataset (the site's broken files included,
    except those that are not DICOM at all)."""
    found = []
    for path in sorted(folder.rglob("*.dcm")):
        try:
            found.append((path, pydicom.dcmread(path)))
        except InvalidDicomError:
            continue
    return found


def _decodes(ds: pydicom.Dataset) -> bool:
    try:
        ds.pixel_array  # noqa: B018 (decoding is the check)
    except ValueError:
        return False
    return True


def _fingerprint(folder: Path, job: str = "tiny") -> DataFingerprint:
    return fingerprint_of(ingest_site(folder), job=job)


def _copy_with_ct_headers(source: Path, target: Path, **changes) -> Path:
    """A copy of a site's folder whose CT slices get ``changes``: a value, or a function of the
    old value (a rewritten calibration); SEG files are copied as they are."""
    shutil.copytree(source, target)
    for path, ds in _headers(target):
        if ds.get("Modality") != "CT" or not _decodes(ds):
            continue  # a broken file stays as broken as it was
        for keyword, change in changes.items():
            setattr(ds, keyword, change(ds.get(keyword)) if callable(change) else change)
        ds.save_as(path)
    return target


@pytest.fixture(scope="module")
def reference(tiny_federation: Path) -> DataFingerprint:
    """The fingerprint a job at site-1 would keep."""
    return _fingerprint(tiny_federation / SITE)


def _shifted(tiny_federation: Path, tmp_path: Path, offset_hu: float) -> Path:
    return _copy_with_ct_headers(
        tiny_federation / SITE,
        tmp_path / "shifted",
        RescaleIntercept=lambda old: float(old) + offset_hu,
    )


# -- the fingerprint -----------------------------------------------------------------------------


def test_the_fingerprint_describes_the_site_in_aggregate(reference: DataFingerprint) -> None:
    assert reference.series == reference.patients == 3
    assert sum(reference.vendor_mix.values()) == pytest.approx(1.0)
    assert sum(reference.slice_thickness_mix.values()) == pytest.approx(1.0)
    assert all(name.endswith(" mm") for name in reference.slice_thickness_mix)
    quantiles = list(reference.hu.quantiles_hu.values())
    assert quantiles == sorted(quantiles) and quantiles[0] > -500
    assert sum(reference.hu.histogram_shares) == pytest.approx(1.0)
    assert reference.slice_spacing_mm["0"] <= reference.slice_spacing_mm["50"]
    assert 0 < reference.labels.lesion_voxel_fraction < reference.labels.prevalence <= 1


def test_the_fingerprint_holds_no_identifier_uid_or_date(
    tiny_federation: Path, reference: DataFingerprint
) -> None:
    identities, secrets = [], set()
    for _, ds in _headers(tiny_federation / SITE):
        born = datetime.datetime.strptime(ds.PatientBirthDate, "%Y%m%d").date()
        identities.append(
            PatientIdentity(
                name=str(ds.PatientName),
                patient_id=ds.PatientID,
                birth_date=born,
                sex=ds.PatientSex,
                age_years=0,
            )
        )
        secrets |= {ds.StudyDate, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}
    result = ingest_site(tiny_federation / SITE)
    secrets |= {p.patient_key for p in result.patients}
    secrets |= {v.series_key for p in result.patients for v in p.volumes}

    text = reference.model_dump_json(indent=2)
    assert leaks_in({"fingerprint": text.encode()}, needles(identities)) == []
    assert [s for s in secrets if s in text] == []
    assert not re.search(r"\d+(\.\d+){3,}", text), "no UID-like value"
    assert not re.search(r"(19|20)\d{6}", text), "no DICOM date"
    assert set(json.loads(text)) == set(DataFingerprint.model_fields)


def test_a_fingerprint_reads_back_as_written(reference: DataFingerprint, tmp_path: Path) -> None:
    path = fingerprint_path(tmp_path, "job-1")
    write_fingerprint(reference, path)
    assert path == tmp_path / "job-1" / "fingerprint.json"
    assert read_fingerprint(path) == reference


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "not valid JSON"),
        ('{"format": "other"}', "expected format 'fedseg-data-fingerprint-v1'"),
        ('{"format": "fedseg-data-fingerprint-v1", "job": "j"}', "series: Field required"),
    ],
)
def test_a_damaged_fingerprint_names_the_file_and_the_problem(
    tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "fingerprint.json"
    path.write_text(content)
    with pytest.raises(FingerprintError, match=re.escape(expected)) as error:
        read_fingerprint(path)
    assert str(path) in str(error.value)


def test_a_job_writes_its_fingerprint_in_the_sites_private_folder(
    tiny_federation: Path, tmp_path: Path, reference: DataFingerprint
) -> None:
    workspace = tmp_path / "workspace"
    private = tmp_path / "workspace-private"
    job = LocalJob(
        spec=tiny_spec(),
        site=SITE,
        config=SiteConfig(
            data_dir=tiny_federation / SITE,
            cache_dir=tmp_path / "cache",
            policy=PrivacyPolicy.for_simulated_data(),
        ),
        state_dir=workspace / "fedseg" / "job-7",
        simulation=True,
        job_id="job-7",
        private_dir=private,
    )
    written = read_fingerprint(private / "job-7" / "fingerprint.json")
    assert written == reference.model_copy(update={"job": job.job_id})
    assert not list(workspace.rglob("fingerprint.json")), "never in the FLARE workspace"


# -- the comparison ------------------------------------------------------------------------------


def test_unchanged_data_shows_no_drift(
    tiny_federation: Path, tmp_path: Path, reference: DataFingerprint
) -> None:
    copy = shutil.copytree(tiny_federation / SITE, tmp_path / "copy")
    report = compare_fingerprints(reference, _fingerprint(copy))
    assert report.drifted == ()
    assert [f.value for f in report.features] == [0.0] * len(Feature)


@pytest.mark.parametrize("offset_hu", [60.0, -40.0])
def test_an_hu_offset_is_flagged_with_its_sign_and_size(
    tiny_federation: Path, tmp_path: Path, reference: DataFingerprint, offset_hu: float
) -> None:
    report = compare_fingerprints(
        reference, _fingerprint(_shifted(tiny_federation, tmp_path, offset_hu))
    )
    verdict = {f.feature: f for f in report.features}
    assert verdict[Feature.HU_SHIFT].flagged
    assert verdict[Feature.HU_SHIFT].value == pytest.approx(offset_hu, abs=2)
    assert f"median {offset_hu:+.0f} HU" in verdict[Feature.HU_SHIFT].note
    assert verdict[Feature.HU_PSI].flagged
    # Only the calibration moved.
    assert {f.feature for f in report.drifted} == {Feature.HU_SHIFT, Feature.HU_PSI}


def test_an_offset_within_calibration_tolerance_is_not_flagged(
    tiny_federation: Path, tmp_path: Path, reference: DataFingerprint
) -> None:
    report = compare_fingerprints(reference, _fingerprint(_shifted(tiny_federation, tmp_path, 5)))
    shift = next(f for f in report.features if f.feature is Feature.HU_SHIFT)
    assert shift.value == pytest.approx(5, abs=1) and not shift.flagged


def test_a_new_vendor_is_flagged_in_the_vendor_mix(
    tiny_federation: Path, tmp_path: Path, reference: DataFingerprint
) -> None:
    moved = _copy_with_ct_headers(
        tiny_federation / SITE, tmp_path / "vendor", Manufacturer="ACME Imaging"
    )
    report = compare_fingerprints(reference, _fingerprint(moved))
    assert [f.feature for f in report.drifted] == [Feature.VENDOR_MIX]
    vendor = report.drifted[0]
    assert vendor.value == 1.0
    assert "new: ACME Imaging" in vendor.note and "ACME Imaging 100%" in vendor.current


def test_another_sites_scanner_and_protocol_are_flagged(
    tiny_federation: Path, reference: DataFingerprint
) -> None:
    other = _fingerprint(tiny_federation / "site-2")
    assert other.vendor_mix != reference.vendor_mix  # the simulator's site profiles differ
    report = compare_fingerprints(reference, other)
    flagged = {f.feature for f in report.drifted}
    assert {Feature.VENDOR_MIX, Feature.SLICE_THICKNESS_MIX} <= flagged


def test_thresholds_decide_the_verdict(
    tiny_federation: Path, tmp_path: Path, reference: DataFingerprint
) -> None:
    shifted = _fingerprint(_shifted(tiny_federation, tmp_path, 60))
    lenient = DriftThresholds(hu_shift=100, hu_psi=100)
    assert compare_fingerprints(reference, shifted, lenient).drifted == ()


@pytest.mark.parametrize(
    ("reference", "current", "expected"),
    [
        ({"A": 1.0}, {"A": 1.0}, 0.0),
        ({"A": 1.0}, {"B": 1.0}, 1.0),
        ({"A": 0.5, "B": 0.5}, {"A": 0.75, "B": 0.25}, 0.25),
        ({"A": 0.8, "B": 0.2}, {"A": 0.8, "C": 0.2}, 0.2),
    ],
)
def test_total_variation_of_mixes(reference: dict, current: dict, expected: float) -> None:
    assert total_variation(reference, current) == pytest.approx(expected)


def test_psi_is_zero_for_one_histogram_and_grows_with_the_shift() -> None:
    base = [0.1, 0.4, 0.4, 0.1]
    assert population_stability_index(base, base) == 0.0
    small = population_stability_index(base, [0.1, 0.35, 0.45, 0.1])
    large = population_stability_index(base, [0.0, 0.1, 0.4, 0.5])
    assert 0 < small < 0.1 < 0.25 < large


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_a_threshold_must_be_positive_and_names_its_field(bad: float) -> None:
    with pytest.raises(ValueError, match=r"vendor_mix: expected a number > 0"):
        DriftThresholds(vendor_mix=bad)


# -- the command ---------------------------------------------------------------------------------


@pytest.fixture
def private_dir(tmp_path: Path, reference: DataFingerprint) -> Path:
    """A site's private folder after two jobs (job-b the newer)."""
    private = tmp_path / "private"
    for job, written in (("job-a", 1_000_000), ("job-b", 2_000_000)):
        path = fingerprint_path(private, job)
        write_fingerprint(reference.model_copy(update={"job": job}), path)
        os.utime(path, (written, written))
    return private


def test_the_command_exits_1_on_drift_and_draws_the_plot(
    tiny_federation: Path, tmp_path: Path, private_dir: Path, capsys
) -> None:
    shifted = _shifted(tiny_federation, tmp_path, 60)
    plot = tmp_path / "plots" / "drift.png"
    argv = ["site", "drift", "--data", str(shifted), "--private-dir", str(private_dir)]
    assert main([*argv, "--job", "job-a", "--plot", str(plot)]) == 1
    out = capsys.readouterr().out
    assert "job-a" in out and "+60 HU" in out and "drift: hu_shift, hu_psi" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_command_exits_0_without_drift_against_the_newest_job(
    tiny_federation: Path, private_dir: Path, capsys
) -> None:
    argv = ["site", "drift", "--data", str(tiny_federation / SITE)]
    assert main([*argv, "--private-dir", str(private_dir)]) == 0
    out = capsys.readouterr().out
    assert str(fingerprint_path(private_dir, "job-b")) in out and "no drift" in out


def test_the_command_takes_thresholds_and_a_fingerprint_file(
    tiny_federation: Path, tmp_path: Path, private_dir: Path
) -> None:
    shifted = _shifted(tiny_federation, tmp_path, 60)
    argv = ["site", "drift", "--data", str(shifted)]
    argv += ["--fingerprint", str(fingerprint_path(private_dir, "job-a"))]
    assert main([*argv, "--threshold", "hu_shift=100", "--threshold", "hu_psi=100"]) == 0


def test_the_command_reads_private_dir_data_and_cache_from_the_kit(
    tiny_federation: Path, tmp_path: Path, reference: DataFingerprint
) -> None:
    kit = tmp_path / "site-1-kit"
    (kit / "local").mkdir(parents=True)
    (kit / "local" / "fedseg_site.yaml").write_text(f"data_dir: {tiny_federation / SITE}\n")
    write_fingerprint(reference, fingerprint_path(tmp_path / "site-1-kit-private", "job-a"))
    assert main(["site", "drift", "--kit", str(kit), "--job", "job-a"]) == 0
    assert list((tmp_path / "site-1-kit-private" / "cache").iterdir()), "the site's cache"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--private-dir", "{private}", "--job", "job-c"], "jobs with one: job-a, job-b"),
        (["--private-dir", "{private}", "--job", "../job-a"], "expected a job name or id"),
        (["--private-dir", "{tmp}/empty"], "no job fingerprint in"),
        ([], "say what to compare with"),
        (["--fingerprint", "{tmp}/missing.json"], "no fingerprint there"),
    ],
)
def test_the_command_says_what_to_pass(
    tiny_federation: Path,
    tmp_path: Path,
    private_dir: Path,
    capsys,
    extra: list[str],
    expected: str,
) -> None:
    extra = [a.format(private=private_dir, tmp=tmp_path) for a in extra]
    assert main(["site", "drift", "--data", str(tiny_federation / SITE), *extra]) == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("threshold", ["hu_shift", "colour=1", "hu_shift=-3", "hu_shift=x"])
def test_a_bad_threshold_is_a_usage_error(threshold: str, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["site", "drift", "--data", "x", "--fingerprint", "f", "--threshold", threshold])
    assert exited.value.code == 2
    assert "--threshold" in capsys.readouterr().err
