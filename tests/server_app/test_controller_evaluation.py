"""The controller's evaluation phase through FLARE's simulator: cross-site matrix, HD95,
subgroups that respect the minimum, the signed final model, and the report rebuilt from disk."""

import json

import pytest

from fedseg.cli import main
from jobs import keys
from server_app.model_manifest import verify_model
from server_app.report import rebuild_report, write_report
from simulator.federation import run_simulation
from tests.conftest import tiny_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tiny_federation, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluation-run")
    spec = tiny_spec(training={"rounds": 1})
    result = run_simulation(spec, data_dir=tiny_federation, out_dir=out)
    write_report(result.history, spec=spec.to_plain(), out_dir=out, wall_s=result.wall_s)
    return result


def test_every_local_model_is_evaluated_at_every_site(run):
    history = run.history
    assert {(c.model, c.site) for c in history.cross_site} == {
        (model, site) for model in ("site-1", "site-2") for site in ("site-1", "site-2")
    }
    assert all(c.model_round == 0 and not c.missing and not c.refused for c in history.cross_site)
    assert history.cross_site_not_shared == {}
    # A site's own local model on its own held-out patients is in the matrix too.
    assert all(c.val_patients >= 1 for c in history.cross_site)


def test_final_metrics_carry_hd95_fields_and_no_small_subgroup(run):
    for record in run.history.final:
        assert record.val_lesion_volumes is not None and record.val_hd95_missing is not None
        assert record.val_lesion_volumes >= record.val_hd95_missing
        # 1 held-out patient per site: every cell is below 5, so none was sent.
        assert record.subgroups == []
    for record in run.history.rounds:
        assert record.subgroups is None  # training rounds carry no subgroup cells


def test_the_final_model_is_signed_and_verifies_from_the_results_folder(run):
    model = run.out_dir / "models" / "final_model.pt"
    result = verify_model(model, spec=tiny_spec(training={"rounds": 1}).to_plain())
    assert result.ok, result.problems
    assert result.simulation  # the simulator has no startup kit
    manifest = result.manifest
    assert manifest["contributing_sites"] == ["site-1", "site-2"]
    epsilon = {r.site: r.epsilon for r in run.history.rounds}
    assert manifest["epsilon_per_site"] == epsilon
    assert manifest["rounds_completed"] == 1


def test_report_rebuilds_identically_from_the_saved_results(run):
    names = ["report.json", "report.md", "model_card.md"]
    before = {name: (run.out_dir / name).read_bytes() for name in names}
    assert main(["report", str(run.out_dir)]) == 0
    assert {name: (run.out_dir / name).read_bytes() for name in names} == before
    report = json.loads(before["report.json"])
    assert report["cross_site"]["models"] == [keys.GLOBAL_MODEL, "site-1", "site-2"]
    assert report["model"]["signer_kind"] == "simulation"
    assert rebuild_report(run.out_dir).to_json() == report
