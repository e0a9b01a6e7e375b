"""Experiment tracking at the server in MLflow: the sites' forwarded metrics, the federation's
per-round scalars, the spec as parameters and the signed final model as an artifact.

FLARE's own ``MLflowReceiver`` with fedseg's settings fixed: a job cannot set the tracking URI,
the experiment or the artifact folder. The store is a local SQLite database (MLflow 3 refuses
its old file store) with an artifact folder beside it, in ``<server run dir>/mlflow/`` or in
the folder the server's own environment names (``MLFLOW_STORE_ENV``). It records only what the
sites already send the server.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

# MLflow 3 sends usage telemetry to its vendor by default; a federation's server sends nothing
# outside the federation unless its operator says so (set it to "false" to opt in).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from nvflare.apis.analytix import ANALYTIC_EVENT_TYPE, TrackConst
from nvflare.apis.fl_context import FLContext
from nvflare.app_opt.tracking.mlflow.mlflow_receiver import (
    MLflowReceiver,
    _get_job_name_from_fl_ctx,
)

from server_app.controller import FINAL_MODEL, OUTPUT_FOLDER
from server_app.history import RunHistory, read_history
from server_app.model_manifest import manifest_paths
from server_app.tracking import MLFLOW_FOLDER, MLFLOW_STORE_ENV, federation_scalars

__all__ = [
    "DATABASE",
    "FEDERATION_RUN",
    "MODEL_ARTIFACTS",
    "RUN_TAG",
    "SITE_TAG",
    "ServerMLflowReceiver",
    "spec_params",
    "tracking_uri",
]

DATABASE = "mlflow.db"
"""The SQLite file of the store; ``mlflow ui --backend-store-uri sqlite:///<store>/mlflow.db``."""
ARTIFACTS = "artifacts"
"""Artifact folder of the store, one sub-folder per experiment (= job name)."""
FEDERATION_RUN = "federation"
"""Run name prefix (and ``fedseg.run`` tag) of the run that holds the whole federation."""
MODEL_ARTIFACTS = "model"
"""Artifact folder of the federation run: the final model with its manifest and signature."""
RUN_TAG = "fedseg.run"
"""Tag saying what a run holds: ``site`` (one site's forwarded metrics) or ``federation``."""
SITE_TAG = "fedseg.site"
"""Tag of a site's run: the site's name."""
_MAX_PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch request


def tracking_uri(store: Path) -> str:
    """MLflow's URI of the SQLite store in folder ``store``."""
    return f"sqlite:///{Path(store).resolve() / DATABASE}"


def spec_params(spec: Mapping, prefix: str = "") -> Iterator[tuple[str, str]]:
    """The spec (plain data) as flat MLflow parameters: ``training.lr`` -> ``"0.003"``; lists,
    numbers, booleans and null as JSON (``model.channels`` -> ``"[4, 8]"``) (pure)."""
    for key, value in spec.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from spec_params(value, prefix=f"{name}.")
        else:
            yield name, value if isinstance(value, str) else json.dumps(value)


class ServerMLflowReceiver(MLflowReceiver):
    """FLARE's MLflow receiver writing into the server's own store; takes no arguments.

    One MLflow experiment per job name; one run per site with the metrics the site forwarded
    (``val_dice``, ``val_hd95_mm``, ``epsilon`` per round, as in TensorBoard); at the end of the
    job a ``federation`` run with ``federation_scalars`` of the server's history, the spec as
    parameters (on every run), and the final model with its signed manifest as artifacts.
    """

    def __init__(self) -> None:
        super().__init__(events=[f"fed.{ANALYTIC_EVENT_TYPE}"])
        self._store: Path | None = None
        self._job_id_tag: str | None = None

    def _store_dir(self, fl_ctx: FLContext) -> Path:
        folder = os.environ.get(MLFLOW_STORE_ENV)
        if folder:
            return Path(folder)
        return Path(self._run_dir(fl_ctx)) / MLFLOW_FOLDER

    @staticmethod
    def _run_dir(fl_ctx: FLContext) -> Path:
        return Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))

    def _get_tracking_uri(self, fl_ctx: FLContext) -> str:
        return tracking_uri(self._store)

    def _get_job_id_tag(self, fl_ctx: FLContext) -> str:
        # FLARE derives the simulator's tag from the clock, per site: one tag for the whole job.
        if self._job_id_tag is None:
            self._job_id_tag = super()._get_job_id_tag(fl_ctx)
        return self._job_id_tag

    def initialize(self, fl_ctx: FLContext) -> None:
        self._store = self._store_dir(fl_ctx)
        self._store.mkdir(parents=True, exist_ok=True)
        experiment = _get_job_name_from_fl_ctx(fl_ctx) or "fedseg"
        self.artifact_location = str(self._store.resolve() / ARTIFACTS / experiment)
        self.kw_args = {
            TrackConst.EXPERIMENT_NAME: experiment,
            TrackConst.RUN_NAME: "fedseg",
            TrackConst.EXPERIMENT_TAGS: {},
            TrackConst.RUN_TAGS: {RUN_TAG: "site"},
        }
        super().initialize(fl_ctx)
        for site, run_id in self.run_ids.items():
            self.mlflow_clients[site].set_tag(run_id, SITE_TAG, site)

    def finalize(self, fl_ctx: FLContext) -> None:
        history_path = self._run_dir(fl_ctx) / OUTPUT_FOLDER / "history.json"
        history = read_history(history_path) if history_path.is_file() else None
        params = [Param(k, v) for k, v in spec_params(history.spec or {})] if history else []
        for site, run_id in self.run_ids.items():
            self._log_params(self.mlflow_clients[site], run_id, params)
        super().finalize(fl_ctx)  # flushes and closes the site runs
        if history is None:
            self.log_warning(fl_ctx, f"no {history_path}: no MLflow federation run recorded")
            return
        self._record_federation(fl_ctx, history, params)

    @staticmethod
    def _log_params(client: MlflowClient, run_id: str, params: list[Param]) -> None:
        for start in range(0, len(params), _MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, params=params[start : start + _MAX_PARAMS_PER_BATCH])

    def _record_federation(self, fl_ctx: FLContext, history: RunHistory, params: list) -> None:
        client = MlflowClient(tracking_uri=tracking_uri(self._store))
        job_id = self._get_job_id_tag(fl_ctx)
        run_name = f"{FEDERATION_RUN}-{job_id[:6]}-{history.job_name}"
        tags = {"job_id": job_id, "run_name": run_name, RUN_TAG: FEDERATION_RUN}
        if history.stopped_reason:
            tags["fedseg.stopped_reason"] = history.stopped_reason
        run_id = client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
        now = int(time.time() * 1000)
        metrics = [
            Metric(tag, value, now, step) for tag, value, step in federation_scalars(history)
        ]
        client.log_batch(run_id, metrics=metrics)
        self._log_params(client, run_id, params)
        output = self._run_dir(fl_ctx) / OUTPUT_FOLDER
        client.log_artifact(run_id, str(output / "history.json"))
        model = output / FINAL_MODEL
        for path in (model, *manifest_paths(model)):
            if path.is_file():
                client.log_artifact(run_id, str(path), artifact_path=MODEL_ARTIFACTS)
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
