"""The public cohort: other profiles than any site's, its own patients, files ingestion reads."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pydicom
import pytest

from fedseg.cli import main
from simulator.cohort_manifest import (
    MANIFEST_NAME,
    PUBLIC_FOLDER,
    OutputFolderNotEmptyError,
    PublicCohortSummary,
)
from simulator.site_profiles import SiteProfile, public_profiles, site_profiles
from simulator.synthetic_data import generate_federation_data, generate_public_cohort
from site_app.ingestion import ingest_site

SMALL = {"patients": 4, "seed": 3, "matrix": 32}
SEEDS = range(5)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> PublicCohortSummary:
    return generate_public_cohort(out_dir=tmp_path_factory.mktemp("public"), **SMALL)


def _every_site_profile() -> list[SiteProfile]:
    # 8 sites: every vendor twice, whatever the seed's rotation.
    return [p for seed in SEEDS for p in site_profiles(seed=seed, sites=8, matrix=64)]


@pytest.mark.parametrize("seed", SEEDS)
def test_public_centres_differ_from_every_site_in_vendor_and_calibration(seed: int) -> None:
    sites = _every_site_profile()
    for public in public_profiles(seed=seed, matrix=64):
        assert public.scanner.manufacturer not in {s.scanner.manufacturer for s in sites}
        assert public.scanner.model_name not in {s.scanner.model_name for s in sites}
        assert abs(public.intensity_offset_hu) > max(abs(s.intensity_offset_hu) for s in sites)


@pytest.mark.parametrize("seed", SEEDS)
def test_public_lesions_are_larger_brighter_and_more_common(seed: int) -> None:
    sites = _every_site_profile()
    for public in public_profiles(seed=seed, matrix=64):
        radius_px = public.lesion_radius_mm[0] / public.pixel_spacing_mm
        assert radius_px > max(s.lesion_radius_mm[0] / s.pixel_spacing_mm for s in sites)
        assert public.lesion_contrast_hu[0] > max(s.lesion_contrast_hu[0] for s in sites)
        assert public.lesion_contrast_hu[1] > max(s.lesion_contrast_hu[1] for s in sites)
        assert public.lesion_prevalence >= 0.85


def test_the_cohort_ingests_as_usable_patients_of_the_public_vendors(
    cohort: PublicCohortSummary,
) -> None:
    result = ingest_site(cohort.folder)
    assert result.quarantine == ()
    assert len(result.patients) == SMALL["patients"] == len(cohort.cases)
    assert {p.manufacturer for p in result.patients} == {
        centre.profile.scanner.manufacturer for centre in cohort.centres
    }
    volumes = {v.series_key: v for p in result.patients for v in p.volumes}
    for case in cohort.cases:
        volume = volumes[case.series_key]
        assert volume.image_hu.shape == (32, 32, case.slices)
        assert int(volume.label.sum()) == case.lesion_voxels


def test_the_manifest_records_each_centre_profile(cohort: PublicCohortSummary) -> None:
    manifest = json.loads((cohort.out_dir / MANIFEST_NAME).read_text())
    assert (manifest["cohort"], manifest["folder"], manifest["parameters"]) == (
        "public",
        PUBLIC_FOLDER,
        SMALL,
    )
    assert [c["profile"]["name"] for c in manifest["centres"]] == ["public-1", "public-2"]
    assert PublicCohortSummary.from_manifest(manifest, out_dir=cohort.out_dir) == cohort
    assert tuple(c.profile for c in cohort.centres) == public_profiles(seed=3, matrix=32)
    files = [p for p in cohort.folder.rglob("*") if p.is_file()]
    assert len(files) == cohort.files_written == sum(c.slices + 1 for c in cohort.cases)


def test_public_patients_are_none_of_a_sites(cohort: PublicCohortSummary, tmp_path: Path) -> None:
    federation = generate_federation_data(
        out_dir=tmp_path, sites=2, patients_per_site=4, seed=SMALL["seed"], matrix=32
    )
    site_series = {case.series_key for site in federation.sites for case in site.cases}
    assert site_series.isdisjoint(case.series_key for case in cohort.cases)

    def pixels(root: Path) -> set[str]:
        return {
            hashlib.sha256(pydicom.dcmread(path).PixelData).hexdigest()
            for path in root.rglob("slice-[0-9][0-9][0-9].dcm")
        }

    assert pixels(cohort.folder).isdisjoint(pixels(tmp_path))


def test_the_same_cohort_is_reused_and_another_folder_refused(
    cohort: PublicCohortSummary, tmp_path: Path
) -> None:
    assert generate_public_cohort(out_dir=cohort.out_dir, **SMALL) == cohort
    with pytest.raises(OutputFolderNotEmptyError, match="generated with"):
        generate_public_cohort(out_dir=cohort.out_dir, **{**SMALL, "patients": 5})
    with pytest.raises(OutputFolderNotEmptyError, match="holds a synthetic public cohort"):
        generate_federation_data(out_dir=cohort.out_dir, sites=1, patients_per_site=2)


def test_the_cli_writes_a_public_cohort(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["simulate", "data", "--public", "--patients-per-site", "2", "--matrix", "32"]
    assert main([*argv, "--seed", "1", "--out", str(tmp_path)]) == 0
    assert "public cohort of 2 patients" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_NAME, PUBLIC_FOLDER]
    assert main([*argv, "--sites", "2", "--out", str(tmp_path / "other")]) == 2
    assert "--sites" in capsys.readouterr().err
