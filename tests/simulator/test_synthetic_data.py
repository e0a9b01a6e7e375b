"""The synthetic federation: layout, manifest, broken inputs, site differences, determinism."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from pathlib import Path

import highdicom
import numpy as np
import pydicom
import pytest
from pydicom.errors import InvalidDicomError
from pydicom.uid import ImplicitVRLittleEndian, MRImageStorage

from simulator import generate_federation_data
from simulator.broken_inputs import ExpectedReason
from simulator.cohort_manifest import (
    MANIFEST_NAME,
    FederationDataSummary,
    GenerationParameters,
    OutputFolderNotEmptyError,
)
from simulator.dicom_writer import PatientIdentity
from simulator.patients import synthetic_identity
from simulator.site_profiles import SiteProfile, site_profiles
from simulator.synthetic_data import write_federation
from site_app.dicom_series import series_key

TINY = {"sites": 2, "patients_per_site": 2, "seed": 3, "matrix": 32}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> FederationDataSummary:
    return generate_federation_data(out_dir=tmp_path_factory.mktemp("federation"), **TINY)


def _digests(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_sites_hold_complete_ct_series_with_a_seg(federation: FederationDataSummary) -> None:
    root = federation.out_dir
    assert sorted(p.name for p in root.iterdir()) == [MANIFEST_NAME, "site-1", "site-2"]
    for site in federation.sites:
        assert len(site.cases) == site.good_patients == 2
        assert site.patients_written == 4
        assert len(list((root / site.name).glob("case-*"))) == 4
        for case in site.cases:
            slices = sorted((root / case.ct_series).glob("slice-[0-9][0-9][0-9].dcm"))
            assert len(slices) == case.slices == site.slices_per_series >= 16
            first = pydicom.dcmread(slices[0], stop_before_pixels=True)
            assert (first.Rows, first.Columns) == (32, 32)
            assert series_key(first.SeriesInstanceUID) == case.series_key
            seg = highdicom.seg.segread(root / case.seg)
            assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
        files = [p for p in (root / site.name).rglob("*") if p.is_file()]
        assert len(files) == site.files_written


def test_every_site_writes_files_that_pass_strict_reading(
    federation: FederationDataSummary,
) -> None:
    settings = pydicom.config.settings
    saved = settings.reading_validation_mode
    settings.reading_validation_mode = pydicom.config.RAISE
    try:
        for site in federation.sites:
            site_dir = federation.out_dir / site.name
            for path in sorted(site_dir.rglob("slice-[0-9][0-9][0-9].dcm")):
                ds = pydicom.dcmread(path)
                assert ds.pixel_array.shape == (32, 32)
                assert ds.file_meta.TransferSyntaxUID == site.transfer_syntax_uid
            for path in sorted(site_dir.rglob("seg.dcm")):
                assert highdicom.seg.segread(path).SegmentationType == "BINARY"
    finally:
        settings.reading_validation_mode = saved


def test_manifest_matches_the_summary(federation: FederationDataSummary) -> None:
    manifest = json.loads((federation.out_dir / MANIFEST_NAME).read_text())
    assert manifest["parameters"] == TINY
    assert manifest == json.loads(json.dumps(federation.to_manifest()))
    rebuilt = FederationDataSummary.from_manifest(manifest, out_dir=federation.out_dir)
    assert rebuilt == federation


def test_manifest_carries_no_patient_identity(federation: FederationDataSummary) -> None:
    text = (federation.out_dir / MANIFEST_NAME).read_text()
    assert str(federation.out_dir) not in text
    identities = set()
    for path in federation.out_dir.rglob("slice-[0-9][0-9][0-9].dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        identities |= {
            str(ds.PatientName),
            *str(ds.PatientName).split("^"),
            ds.PatientID,
            ds.PatientBirthDate,
            ds.StudyDate,
            ds.AccessionNumber,
            ds.StudyInstanceUID,
            ds.SeriesInstanceUID,
        }
    assert len(identities) > 10
    assert [value for value in identities if value and value in text] == []


def test_injected_identities_reach_the_files_but_not_the_manifest(tmp_path: Path) -> None:
    def distinctive(
        *, rng: np.random.Generator, site: SiteProfile, study_date: datetime.date
    ) -> PatientIdentity:
        identity = synthetic_identity(rng=rng, site=site, study_date=study_date)
        return dataclasses.replace(identity, name="QQXFAMILY^QQXGIVEN", patient_id="QQX-999")

    parameters = GenerationParameters(sites=1, patients_per_site=2, seed=1, matrix=32)
    summary = write_federation(
        parameters=parameters, out_dir=tmp_path, identity_factory=distinctive
    )
    ct = pydicom.dcmread(next((tmp_path / summary.sites[0].cases[0].ct_series).iterdir()))
    assert str(ct.PatientName) == "QQXFAMILY^QQXGIVEN"
    assert "QQX" not in (tmp_path / MANIFEST_NAME).read_text()


def test_each_site_has_every_broken_input_where_the_manifest_says(
    federation: FederationDataSummary,
) -> None:
    root = federation.out_dir
    for site in federation.sites:
        by_reason = {item.expected_reason: item for item in site.broken_inputs}
        assert set(by_reason) == set(ExpectedReason)
        assert all(item.path.startswith(f"{site.name}/case-") for item in site.broken_inputs)
        assert all((root / item.path).exists() for item in site.broken_inputs)

        with pytest.raises(InvalidDicomError):
            pydicom.dcmread(root / by_reason[ExpectedReason.NOT_DICOM].path)

        truncated = root / by_reason[ExpectedReason.TRUNCATED].path
        original = truncated.with_name(truncated.name.replace("-copy", ""))
        assert truncated.stat().st_size == original.stat().st_size // 2
        with pytest.raises(ValueError, match="pixel data"):
            _ = pydicom.dcmread(truncated).pixel_array
        good_case = next(c for c in site.cases if truncated.parent == root / c.ct_series)
        intact = list(truncated.parent.glob("slice-[0-9][0-9][0-9].dcm"))
        assert len(intact) == good_case.slices

        gap_dir = root / by_reason[ExpectedReason.MISSING_SLICES].path
        numbers = sorted(
            int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber)
            for p in gap_dir.glob("*.dcm")
        )
        assert len(numbers) == site.slices_per_series - 1
        assert set(range(1, site.slices_per_series + 1)) - set(numbers) == {
            site.slices_per_series // 2 + 1
        }

        seg = highdicom.seg.segread(root / by_reason[ExpectedReason.LABEL_WITHOUT_SERIES].path)
        on_disk = {
            pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
            for p in gap_dir.glob("*.dcm")
        }
        referenced = {uid for _, _, uid in seg.get_source_image_uids()}
        assert len(referenced - on_disk) == 1

        mr_dir = root / by_reason[ExpectedReason.UNSUPPORTED_MODALITY].path
        mr = pydicom.dcmread(next(mr_dir.glob("*.dcm")), stop_before_pixels=True)
        assert (mr.Modality, mr.SOPClassUID) == ("MR", MRImageStorage)
        assert series_key(mr.SeriesInstanceUID) == (
            by_reason[ExpectedReason.UNSUPPORTED_MODALITY].series_key
        )


def test_sites_differ_in_scanner_geometry_and_encoding() -> None:
    profiles = site_profiles(seed=0, sites=4, matrix=64)
    for attribute in ("manufacturer", "model_name"):
        values = [getattr(p.scanner, attribute) for p in profiles]
        assert len(set(values)) == 4, attribute
    for attribute in ("slice_thickness_mm", "pixel_spacing_mm", "noise_sigma_hu"):
        assert len({getattr(p, attribute) for p in profiles}) == 4, attribute
    assert len({p.scanner.rescale for p in profiles}) == 2
    assert [p.transfer_syntax_uid for p in profiles].count(ImplicitVRLittleEndian) == 1
    for profile in profiles:
        assert 24 <= profile.slices <= 96
        assert 300 <= profile.field_of_view_mm[0] <= 410


def test_generated_sites_record_their_differences(federation: FederationDataSummary) -> None:
    first, second = federation.sites
    assert first.manufacturer != second.manufacturer
    assert first.slice_thickness_mm != second.slice_thickness_mm
    assert first.transfer_syntax_uid != second.transfer_syntax_uid


def test_same_parameters_give_byte_identical_files(
    federation: FederationDataSummary, tmp_path: Path
) -> None:
    again = generate_federation_data(out_dir=tmp_path / "again", **TINY)
    assert _digests(again.out_dir) == _digests(federation.out_dir)


def test_worker_processes_write_the_same_bytes_as_one(
    federation: FederationDataSummary, tmp_path: Path
) -> None:
    parallel = generate_federation_data(out_dir=tmp_path, workers=2, **TINY)
    assert parallel.sites == federation.sites
    assert _digests(parallel.out_dir) == _digests(federation.out_dir)


def test_slices_cover_the_liver_at_every_thickness() -> None:
    for seed in range(5):
        for profile in site_profiles(seed=seed, sites=5, matrix=64):
            coverage = profile.field_of_view_mm[1]
            if profile.slices < 96:  # thin-slice sites stop at 3/2 matrix
                assert coverage == pytest.approx(200.0, abs=profile.slice_thickness_mm)
            assert coverage >= 140.0
    thicknesses = {p.slice_thickness_mm for p in site_profiles(seed=0, sites=5, matrix=64)}
    assert len(thicknesses) == 5 and min(thicknesses) <= 1.5 and max(thicknesses) >= 5.0


def test_another_seed_gives_other_data(federation: FederationDataSummary, tmp_path: Path) -> None:
    other = generate_federation_data(out_dir=tmp_path, **{**TINY, "seed": 4})
    ours, theirs = _digests(federation.out_dir), _digests(other.out_dir)
    # A stray text note may be the same canned text at both seeds; DICOM content must differ.
    shared_dicom = {name for name in set(ours) & set(theirs) if not name.endswith("notes.dcm")}
    assert shared_dicom
    assert all(ours[name] != theirs[name] for name in shared_dicom)


def test_existing_federation_with_same_parameters_is_reused(
    federation: FederationDataSummary,
) -> None:
    before = _digests(federation.out_dir)
    again = generate_federation_data(out_dir=federation.out_dir, **TINY)
    assert again == federation
    assert _digests(federation.out_dir) == before


def test_unrelated_folder_is_never_overwritten(tmp_path: Path) -> None:
    keep = tmp_path / "thesis.txt"
    keep.write_text("do not touch")
    with pytest.raises(OutputFolderNotEmptyError, match=r"thesis\.txt.*choose an empty --out"):
        generate_federation_data(out_dir=tmp_path, **TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis.txt"]
    assert keep.read_text() == "do not touch"


def test_federation_with_other_parameters_is_not_overwritten(
    federation: FederationDataSummary,
) -> None:
    with pytest.raises(OutputFolderNotEmptyError, match="generated with"):
        generate_federation_data(out_dir=federation.out_dir, **{**TINY, "seed": 9})


def test_a_folder_from_another_simulator_version_is_not_reused(tmp_path: Path) -> None:
    (tmp_path / "site-1").mkdir()
    old = {"schema_version": 1, "generator": "fedseg.simulator", "parameters": TINY, "sites": []}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(old))
    with pytest.raises(OutputFolderNotEmptyError, match="another simulator version"):
        generate_federation_data(out_dir=tmp_path, **TINY)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"sites": 0}, "sites"),
        ({"patients_per_site": 1}, "patients_per_site"),
        ({"seed": -1}, "seed"),
        ({"matrix": 8}, "matrix"),
        ({"workers": 0}, "workers"),
    ],
)
def test_invalid_parameters_name_the_field(tmp_path: Path, overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        generate_federation_data(out_dir=tmp_path, **{**TINY, **overrides})
    assert list(tmp_path.iterdir()) == []
