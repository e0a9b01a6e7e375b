"""MLflow at the server: the spec switch, the spec as parameters, and a simulated job read back
with MLflow's own client (site runs, the federation run, the signed final model)."""

import hashlib
import json

import pytest
from mlflow.tracking import MlflowClient

from jobs import keys
from jobs.spec import JobSpecError, parse_spec
from server_app.mlflow_tracking import (
    FEDERATION_RUN,
    MODEL_ARTIFACTS,
    RUN_TAG,
    SITE_TAG,
    spec_params,
    tracking_uri,
)
from server_app.model_manifest import verify_model
from simulator.federation import run_simulation
from tests.conftest import tiny_spec


@pytest.mark.parametrize(
    ("tracking", "message"),
    [
        (
            "wandb",
            "tracking: expected `mlflow` or a mapping of trackers to switch on, e.g. "
            "`tracking: {mlflow: true}`, got 'wandb'",
        ),
        (["mlflow"], "tracking: expected `mlflow` or a mapping of trackers to switch on"),
        ({"mlflow": "maybe"}, "tracking.mlflow: Input should be a valid boolean"),
        ({"wandb": True}, "tracking.wandb: unknown key"),
    ],
)
def test_a_wrong_tracking_value_is_refused_naming_the_field(tracking, message):
    with pytest.raises(JobSpecError, match="1 problem") as error:
        parse_spec({"name": "x", "tracking": tracking}, source="jobs/specs/x.yaml")
    assert message in str(error.value)
    assert "fix the field(s) above in jobs/specs/x.yaml" in str(error.value)


@pytest.mark.parametrize(
    ("tracking", "mlflow"),
    [({}, False), ({"mlflow": True}, True), ({"mlflow": False}, False), ("mlflow", True)],
)
def test_mlflow_is_off_unless_the_spec_switches_it_on(tracking, mlflow):
    assert parse_spec({"name": "x", "tracking": tracking}).tracking.mlflow is mlflow
    assert parse_spec({"name": "x"}).tracking.mlflow is False


def test_the_spec_becomes_flat_parameters():
    params = dict(spec_params(tiny_spec().to_plain()))
    assert params["name"] == "tiny"
    assert params["training.lr"] == "0.003"
    assert params["model.channels"] == "[4, 8]"
    assert params["model.init"] == "null"
    assert params["privacy.enabled"] == "true"
    assert params["tracking.mlflow"] == "false"
    assert len(params) < 100  # one MLflow log_batch


def _metric(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_a_simulation_records_sites_federation_spec_and_signed_model_in_mlflow(
    tiny_federation, tmp_path
):
    spec = tiny_spec(tracking={"mlflow": True})
    result = run_simulation(spec, data_dir=tiny_federation, out_dir=tmp_path)
    history = result.history
    assert history.rounds_completed == 2
    client = MlflowClient(tracking_uri=tracking_uri(tmp_path / "mlflow"))
    experiment = client.get_experiment_by_name(spec.name)
    runs = client.search_runs([experiment.experiment_id])
    sites = {run.data.tags[SITE_TAG]: run for run in runs if run.data.tags[RUN_TAG] == "site"}
    (federation,) = [run for run in runs if run.data.tags[RUN_TAG] == FEDERATION_RUN]
    assert sorted(sites) == ["site-1", "site-2"]
    expected_params = dict(spec_params(spec.to_plain()))

    for site, run in sites.items():
        assert run.info.status == "FINISHED"
        assert run.data.params == expected_params
        records = {r.round: r for r in history.rounds if r.site == site}
        final = next(r for r in history.final if r.site == site)
        # Validation of the global model at its round; epsilon after each training round.
        assert _metric(client, run.info.run_id, keys.VAL_DICE) == [
            (0, pytest.approx(records[0].val_dice)),
            (1, pytest.approx(records[1].val_dice)),
            (2, pytest.approx(final.val_dice)),
        ]
        assert _metric(client, run.info.run_id, keys.EPSILON) == [
            (k + 1, pytest.approx(records[k].epsilon)) for k in (0, 1)
        ]
        # A DP job sends nothing computed on training patients without noise.
        assert keys.TRAIN_LOSS not in run.data.metrics

    run_id = federation.info.run_id
    assert federation.info.status == "FINISHED"
    assert federation.data.params == expected_params
    report = json.loads((tmp_path / "history.json").read_text())
    first = [r["val_dice"] for r in report["rounds"] if r["round"] == 0]
    mean_dice = _metric(client, run_id, "federation/mean_val_dice")
    assert [step for step, _ in mean_dice] == [0, 1, 2]
    assert mean_dice[0][1] == pytest.approx(sum(first) / len(first))
    assert mean_dice[2][1] == pytest.approx(sum(r.val_dice for r in history.final) / 2)
    assert _metric(client, run_id, "federation/site_updates") == [(1, 2.0), (2, 2.0)]
    assert _metric(client, run_id, "federation/max_epsilon") == [
        (k + 1, pytest.approx(max(r.epsilon for r in history.rounds if r.round == k)))
        for k in (0, 1)
    ]

    # The final model with its signed manifest, as the results folder has them.
    listed = {f.path for f in client.list_artifacts(run_id, MODEL_ARTIFACTS)}
    names = ("final_model.pt", "final_model.manifest.json", "final_model.manifest.sig")
    assert listed == {f"{MODEL_ARTIFACTS}/{name}" for name in names}
    downloaded = tmp_path / "downloaded"
    downloaded.mkdir()
    model_dir = client.download_artifacts(run_id, MODEL_ARTIFACTS, str(downloaded))
    for name in names:
        assert _sha256(downloaded / MODEL_ARTIFACTS / name) == _sha256(tmp_path / "models" / name)
    model = downloaded / MODEL_ARTIFACTS / "final_model.pt"
    manifest = json.loads((downloaded / MODEL_ARTIFACTS / names[1]).read_text())
    assert manifest["model_sha256"] == _sha256(model)
    verified = verify_model(model, spec=spec.to_plain())
    assert verified.ok, verified.problems
    assert str(downloaded) in model_dir
