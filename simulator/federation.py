"""Run a JobSpec over simulated sites with FLARE's own simulator (SimEnv), on one machine.

Each site is a FLARE ``simulator_worker`` process reading its own DICOM folder; the server runs
fedseg's controller. Progress is read from the server's progress file while the run goes on.
TensorBoard event files of the server and the sites are gathered under ``<out>/tensorboard/``;
with ``tracking.mlflow`` the server writes its MLflow store straight into ``<out>/mlflow/``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from nvflare.app_common.widgets.component_path_authorizer import CLASS_ALLOW_LIST
from nvflare.fuel.utils.log_utils import default_log_dict
from nvflare.recipe import SimEnv

from jobs.components import SERVER_COMPONENTS, SITE_COMPONENTS, TB_FOLDER
from jobs.spec import JobSpec
from researcher_app.flare_job import FedSegRecipe
from server_app.controller import OUTPUT_FOLDER, SIMULATION_MODEL_STORE_ENV
from server_app.history import RunHistory, SiteRound, read_history
from server_app.tracking import MLFLOW_FOLDER, MLFLOW_STORE_ENV, federation_scalars
from site_app.policy import PrivacyPolicy
from site_app.site_mode import SIMULATION_SITE_CONFIGS_ENV
from site_app.training import SITES_SHARING_DEVICE_ENV

__all__ = [
    "SimulationError",
    "SimulationResult",
    "discover_sites",
    "run_simulation",
    "threads_per_site",
]

log = logging.getLogger(__name__)

SIMULATOR_JOB_ID = "simulate_job"  # FLARE's simulator always names the job run folder this
TASK_REQUEST_INTERVAL_S = 0.5
"""Seconds a site process waits after each task, and between asks while the server has no task
for it yet (FLARE's default is 2 s; on loopback asking is cheap). Simulation only."""
_SITE_FOLDER = re.compile(r"^site-(\d+)$")


class SimulationError(RuntimeError):
    """The simulated federation could not run or finish; the message says where to look."""


@dataclass(frozen=True)
class SimulationResult:
    history: RunHistory
    out_dir: Path
    workspace: Path
    wall_s: float


def discover_sites(data_dir: Path) -> list[str]:
    """Site folders (``site-1``, ``site-2``, ...) under ``data_dir``, in numeric order."""
    if not data_dir.is_dir():
        raise SimulationError(
            f"{data_dir}: data folder not found; create it with "
            f"`fedseg simulate data --out {data_dir}`"
        )
    sites = [p.name for p in data_dir.iterdir() if p.is_dir() and _SITE_FOLDER.match(p.name)]
    if not sites:
        raise SimulationError(
            f"{data_dir}: no site folders (site-1, site-2, ...) found; "
            f"generate data with `fedseg simulate data --out {data_dir}`"
        )
    return sorted(sites, key=lambda name: int(_SITE_FOLDER.match(name).group(1)))


def _write_site_configs(
    data_dir: Path,
    out_dir: Path,
    sites: list[str],
    site_threads: int,
    site_policies: dict[str, dict],
    cache_dir: Path,
) -> dict[str, Path]:
    config_dir = out_dir / "site_configs"
    config_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for site in sites:
        path = config_dir / f"{site}.yaml"
        config = {
            "data_dir": str((data_dir / site).resolve()),
            # Decoded volumes are kept across runs: re-running a job skips DICOM decoding.
            "cache_dir": str((cache_dir / site).resolve()),
            "num_threads": site_threads,
            # Simulated sites are the researcher's own: non-DP baselines are allowed here.
            # A hospital's own config keeps the default, DP required.
            "policy": PrivacyPolicy.for_simulated_data(**site_policies.get(site, {})).model_dump(
                mode="json"
            ),
        }
        path.write_text(yaml.safe_dump(config, sort_keys=True))
        paths[site] = path
    return paths


def _prepare_workspace(workspace: Path) -> Path:
    """A fresh simulator workspace whose component policy admits exactly fedseg's components,
    as a provisioned kit's does (``jobs.components``)."""
    if workspace.exists():
        shutil.rmtree(workspace)
    local = workspace / "local"
    local.mkdir(parents=True)
    resources = {
        "format_version": 2,
        "class_list_enforcement_mode": "enforce",
        CLASS_ALLOW_LIST: [*SITE_COMPONENTS, *SERVER_COMPONENTS],
    }
    (local / "resources.json").write_text(json.dumps(resources, indent=2))
    # FLARE's console output is reduced to errors; its full logs stay in the workspace.
    log_config = copy.deepcopy(default_log_dict)
    log_config["handlers"]["consoleHandler"]["level"] = "ERROR"
    # In local/: the simulator wipes its workspace at start except local/ and startup/.
    log_config_path = local / "fedseg_flare_log_config.json"
    log_config_path.write_text(json.dumps(log_config, indent=2))
    return log_config_path


def _tail_progress(
    path: Path, stop: threading.Event, on_record: Callable[[SiteRound], None]
) -> None:
    offset = 0
    while True:
        finished = stop.is_set()
        if path.exists():
            with open(path) as stream:
                stream.seek(offset)
                for line in stream:
                    if line.endswith("\n"):
                        on_record(SiteRound.model_validate(json.loads(line)))
                        offset += len(line.encode())
                    else:
                        break
        if finished:
            return
        stop.wait(0.5)


def _collect_tensorboard(workspace: Path, sites: list[str], out: Path) -> None:
    """Copy the run's event files to ``out``: ``server/<site>`` (what the server received via
    FLARE's tracking) and ``sites/<site>`` (each site's own files)."""
    if out.exists():
        shutil.rmtree(out)
    sources = {out / "server": workspace / "server" / SIMULATOR_JOB_ID / TB_FOLDER}
    for site in sites:
        sources[out / "sites" / site] = workspace / site / SIMULATOR_JOB_ID / TB_FOLDER / site
    for target, source in sources.items():
        if source.is_dir():
            shutil.copytree(source, target)


def _write_federation_scalars(history: RunHistory, log_dir: Path) -> None:
    """The federation's own TensorBoard run, from the server's history (step = rounds done):
    ``server_app.tracking.federation_scalars``, the same scalars the MLflow federation run has.
    """
    from nvflare.app_opt.tracking.tb.tb_event_writer import TensorBoardEventWriter

    writer = TensorBoardEventWriter(log_dir=str(log_dir))
    try:
        for tag, value, step in federation_scalars(history):
            writer.add_scalar(tag, value, step)
    finally:
        writer.close()


def threads_per_site(sites: int) -> int:
    """torch threads of each simulated site: an equal share of this machine's cores (>= 1).

    Fixed by the number of sites, not the pool size: torch's float reductions depend on the
    thread count, so a bounded pool gives the same numbers as one process per site, and anything
    that must reproduce a site's numbers outside FLARE (baselines, benchmarks) uses this too.
    """
    return max(1, (os.cpu_count() or 1) // sites)


def run_simulation(
    spec: JobSpec,
    *,
    data_dir: Path,
    out_dir: Path,
    threads: int | None = None,
    on_record: Callable[[SiteRound], None] | None = None,
    site_policies: dict[str, dict] | None = None,
    cache_dir: Path | None = None,
    model_store: Path | None = None,
) -> SimulationResult:
    """Run ``spec`` over every site folder in ``data_dir``; results go to ``out_dir``.

    Args:
        threads: concurrent site processes (FLARE's ``num_threads``); default = one per site.
            Fewer than the sites makes FLARE swap site processes in and out between tasks; DP
            state is kept on disk, so results are the same.
        on_record: called with each site's per-round record as the server receives it.
        site_policies: per-site privacy policy fields (``site_app.policy.PrivacyPolicy``), e.g.
            ``{"site-2": {"max_epsilon_per_job": 8}}`` to simulate one strict hospital.
        cache_dir: root of the per-site caches of decoded volumes (``<cache_dir>/<site>``);
            default ``out_dir/cache``. Runs over the same data may share one.
        model_store: where the simulated server reads ``model.init``'s file (a deployed server
            reads its own ``local/models/``); the CLI passes the spec's folder.
    """
    data_dir = Path(data_dir).resolve()
    out_dir = Path(out_dir).resolve()
    sites = discover_sites(data_dir)
    threads = len(sites) if threads is None else max(1, min(threads, len(sites)))
    out_dir.mkdir(parents=True, exist_ok=True)
    site_threads = threads_per_site(len(sites))
    unknown = sorted(set(site_policies or {}) - set(sites))
    if unknown:
        raise SimulationError(f"site_policies names sites that are not in {data_dir}: {unknown}")
    site_configs = _write_site_configs(
        data_dir,
        out_dir,
        sites,
        site_threads,
        site_policies or {},
        Path(cache_dir) if cache_dir is not None else out_dir / "cache",
    )
    # The server's MLflow store (tracking.mlflow) is this run's alone, like every result here.
    mlflow_store = out_dir / MLFLOW_FOLDER
    if mlflow_store.exists():
        shutil.rmtree(mlflow_store)
    workspace_root = out_dir / "flare_workspace"
    workspace = workspace_root / spec.name
    log_config = _prepare_workspace(workspace)

    # The same job a federation gets; only how its site processes are started (below) tells
    # them they are simulated and where their configs are (site_app.site_mode).
    recipe = FedSegRecipe(spec, sites=sites)
    recipe.add_server_config({"server": {"task_request_interval": TASK_REQUEST_INTERVAL_S}})
    env = SimEnv(
        clients=sites,
        num_threads=threads,
        workspace_root=str(workspace_root),
        log_config=str(log_config),
    )
    server_out = workspace / "server" / SIMULATOR_JOB_ID / OUTPUT_FOLDER
    stop = threading.Event()
    tail = threading.Thread(
        target=_tail_progress,
        args=(server_out / "progress.jsonl", stop, on_record or (lambda record: None)),
        daemon=True,
    )
    tail.start()
    started = time.perf_counter()
    cwd = os.getcwd()  # FLARE's simulator chdir()s into its workspace
    # Site processes inherit it: `threads` of them share the GPU, if there is one.
    environment = {
        SITES_SHARING_DEVICE_ENV: str(threads),
        SIMULATION_SITE_CONFIGS_ENV: str(next(iter(site_configs.values())).parent),
        SIMULATION_MODEL_STORE_ENV: str(Path(model_store or ".").resolve()),
        MLFLOW_STORE_ENV: str(mlflow_store),
    }
    before = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    try:
        recipe.run(env)
    except Exception as error:
        raise SimulationError(
            f"the simulated federation failed: {error}. Site and server logs: {workspace}/*/log.txt"
        ) from error
    finally:
        os.chdir(cwd)
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        stop.set()
        tail.join()
    wall_s = time.perf_counter() - started

    history_path = server_out / "history.json"
    if not history_path.exists():
        raise SimulationError(
            f"the server wrote no results ({history_path} missing); see {workspace}/server/log.txt"
        )
    history = read_history(history_path)
    models = out_dir / "models"
    models.mkdir(exist_ok=True)
    # Models with their signed manifests (final_model.manifest.json/.sig), so
    # `fedseg model verify R/models/final_model.pt` works on the results alone.
    for model in [*server_out.glob("*.pt"), *server_out.glob("*.manifest.*")]:
        shutil.copy2(model, models / model.name)
    shutil.copy2(history_path, out_dir / "history.json")
    _collect_tensorboard(workspace, sites, out_dir / "tensorboard")
    _write_federation_scalars(history, out_dir / "tensorboard" / "federation")
    return SimulationResult(history=history, out_dir=out_dir, workspace=workspace, wall_s=wall_s)
