"""End to end through FLARE's own simulator: real site processes, real DICOM, real Opacus."""

import json

import pydicom
import pytest
import torch

from server_app.history import read_history
from simulator.federation import SimulationError, discover_sites, run_simulation
from site_app.privacy import epsilon_spent
from tests.conftest import tiny_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def first_run(tiny_run):
    return tiny_run


def test_two_sites_two_rounds_end_to_end(first_run):
    history = first_run.history
    assert history.sites == ["site-1", "site-2"]
    assert history.rounds_completed == 2 and history.stopped_reason is None
    assert {(r.site, r.round) for r in history.rounds} == {
        (site, i) for site in ("site-1", "site-2") for i in (0, 1)
    }
    assert {r.site for r in history.final} == {"site-1", "site-2"}
    for record in history.rounds:
        assert record.num_patients >= 1 and record.num_steps >= 1
        assert not record.refused and not record.missing
    models = first_run.out_dir / "models"
    for name in ("global_model_round_0.pt", "global_model_round_2.pt", "final_model.pt"):
        assert (models / name).is_file()


def test_epsilon_grows_per_round_and_matches_the_accountant(first_run):
    spec = tiny_spec()
    for site in first_run.history.sites:
        rounds = sorted(
            (r for r in first_run.history.rounds if r.site == site), key=lambda r: r.round
        )
        assert rounds[0].epsilon < rounds[1].epsilon
        # Recompute from what the site reported: the count release, then DP-SGD at its
        # published sampling rate (from the noised count, not the true one) for its steps.
        steps = sum(r.num_steps for r in rounds)
        assert {r.sample_rate for r in rounds} == {rounds[0].sample_rate}
        expected = epsilon_spent(
            [
                (rounds[0].count_noise_std, 1.0, 1),
                (spec.privacy.noise_multiplier, rounds[0].sample_rate, steps),
            ],
            accountant="rdp",
            delta=spec.privacy.delta,
        )
        assert rounds[1].epsilon == pytest.approx(expected, rel=1e-12)


def test_the_job_ships_no_custom_code(first_run):
    """Components come from the installed package, so BYOC-forbidding sites accept the job."""
    job_dirs = [p for p in first_run.workspace.rglob("custom") if p.is_dir()]
    assert job_dirs == [] or all(not any(d.iterdir()) for d in job_dirs)


def test_report_is_written_and_names_every_site(first_run):
    from server_app.report import write_report

    report = write_report(
        first_run.history, spec=tiny_spec().to_plain(), out_dir=first_run.out_dir
    ).to_json()
    saved = json.loads((first_run.out_dir / "report.json").read_text())
    assert saved["per_site"] == report["per_site"]
    assert [row["site"] for row in saved["per_site"]] == ["site-1", "site-2"]
    markdown = (first_run.out_dir / "report.md").read_text()
    assert "| site-1 |" in markdown and "epsilon" in markdown


def test_no_patient_identifier_leaves_the_site_data(first_run, tiny_federation):
    """Names, IDs and birth dates from the DICOM never appear in logs, reports or messages."""
    identifiers = set()
    for path in list(tiny_federation.rglob("slice-001.dcm"))[:4]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        identifiers |= {str(ds.PatientName), ds.PatientID, ds.PatientBirthDate}
    identifiers.discard("")
    assert identifiers
    leaks = []
    for path in first_run.out_dir.rglob("*"):
        if not path.is_file() or "cache" in path.parts or path.suffix == ".pt":
            continue
        text = path.read_bytes().decode("utf-8", errors="ignore")
        leaks += [f"{path}: {value}" for value in identifiers if value in text]
    assert leaks == []


def test_same_seed_gives_bit_identical_final_weights(first_run, tiny_federation, tmp_path):
    again = run_simulation(tiny_spec(), data_dir=tiny_federation, out_dir=tmp_path)
    a = torch.load(first_run.out_dir / "models" / "final_model.pt")
    b = torch.load(again.out_dir / "models" / "final_model.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_bounded_pool_of_site_processes_gives_the_same_weights(
    first_run, tiny_federation, tmp_path
):
    """threads=1 < 2 sites: FLARE restarts site processes between tasks; DP state is on disk."""
    pooled = run_simulation(tiny_spec(), data_dir=tiny_federation, out_dir=tmp_path, threads=1)
    a = torch.load(first_run.out_dir / "models" / "final_model.pt")
    b = torch.load(pooled.out_dir / "models" / "final_model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    eps_a = {(r.site, r.round): r.epsilon for r in first_run.history.rounds}
    eps_b = {(r.site, r.round): r.epsilon for r in read_history(tmp_path / "history.json").rounds}
    assert eps_a == eps_b


def test_missing_or_empty_data_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SimulationError, match="data folder not found"):
        discover_sites(tmp_path / "nope")
    with pytest.raises(SimulationError, match="no site folders"):
        discover_sites(tmp_path)


def test_sites_that_refuse_a_job_are_reported_with_their_reason(tiny_federation, tmp_path):
    """delta 0.9 is above every site's max_delta: both refuse; the job stops below min_clients,
    saying why (and never quoting the site's exact patient count)."""
    result = run_simulation(
        tiny_spec(privacy={"delta": 0.9}), data_dir=tiny_federation, out_dir=tmp_path
    )
    history = result.history
    assert history.rounds_completed == 0
    assert "fewer than federation.min_clients=2" in history.stopped_reason
    assert "privacy.delta is 0.9, above this site's max_delta" in history.stopped_reason
    assert {r.site for r in history.rounds if r.refused} == {"site-1", "site-2"}


def test_a_strict_site_refuses_and_the_federation_goes_on_without_it(
    first_run, tiny_federation, tmp_path
):
    """site-1 allows a little more than one round's epsilon: the whole-job check refuses the job
    before its first step, so site-1 spends nothing, and site-2 carries on alone."""
    one_round = next(r.epsilon for r in first_run.history.rounds if r.site == "site-1")
    result = run_simulation(
        tiny_spec(federation={"min_clients": 1}),
        data_dir=tiny_federation,
        out_dir=tmp_path,
        site_policies={"site-1": {"max_epsilon_per_job": one_round * 1.2}},
    )
    history = result.history
    assert history.rounds_completed == 2 and history.stopped_reason is None
    by_key = {(r.site, r.round): r for r in history.rounds}
    for index in (0, 1):
        refused = by_key[("site-1", index)]
        assert "the whole job would spend epsilon" in refused.refused
        assert "max_epsilon_per_job" in refused.refused
        assert refused.num_steps == 0 and not refused.epsilon  # nothing spent
        assert by_key[("site-2", index)].refused is None
        assert by_key[("site-2", index)].num_steps >= 1
