"""The FLARE components a fedseg job may build, by exact class path, on each side.

Every participant's ``local/resources.json`` (provisioned kits and the simulator's workspace)
allows exactly these paths and nothing else, so a job, which is configuration written by a
researcher, can only assemble fedseg's own components: no other callable of fedseg's packages
(e.g. the model signer or the PACS importer) and none of FLARE's (e.g. a script launcher).
``researcher_app.flare_job.build_job`` uses only these; a test compares an exported job with
this list.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "SERVER_COMPONENTS",
    "SERVER_CONTROLLER",
    "SITE_COMPONENTS",
    "SITE_EXECUTOR",
    "TB_FOLDER",
    "has_variable_references",
    "written_args",
]

TB_FOLDER = "tb_events"
"""TensorBoard event folder in each run directory (server and sites), one sub-folder per site."""

SITE_EXECUTOR = "site_app.executor.SiteTrainer"

SITE_COMPONENTS = (
    SITE_EXECUTOR,
    "site_app.tracking.SiteMetricsTracker",
    "site_app.tracking.SiteTensorBoardReceiver",
    "site_app.tracking.MetricsToServer",
)
"""What a site builds for a fedseg job: the executor and the metrics tracking (no arguments
a job can set, except the executor's ``spec``)."""

SERVER_CONTROLLER = "server_app.controller.FedSegController"

SERVER_COMPONENTS = (
    SERVER_CONTROLLER,
    "server_app.tracking.ServerTensorBoardReceiver",
    "server_app.mlflow_tracking.ServerMLflowReceiver",
)
"""What the server builds for a fedseg job: the FedAvg controller, its TensorBoard writer and
(``tracking.mlflow``) its MLflow writer, neither with arguments a job can set."""


def _entries(config: dict) -> Iterator[dict]:
    for entry in config.get("executors") or []:
        if isinstance(entry, dict) and isinstance(entry.get("executor"), dict):
            yield entry["executor"]
    for key in ("workflows", "components"):
        for entry in config.get(key) or []:
            if isinstance(entry, dict):
                yield entry


def written_args(config_file: Path, component_path: str) -> dict | None:
    """The arguments the job's config file (``config_fed_client.json`` or
    ``config_fed_server.json``) gives ``component_path``, exactly as the job wrote them.

    FLARE fills in ``{NAME}`` and ``{$ENV_VAR}`` references in a job's config with the values of
    the participant that runs it, before a component sees its arguments. A component that may
    echo an argument back (the spec's name in a refusal, the spec in the run history) compares
    what it got with this: any difference means the job referenced the participant's variables.
    None when the file or the component is not there.
    """
    try:
        config = json.loads(Path(config_file).read_text())
    except (OSError, ValueError):
        return None
    for entry in _entries(config):
        if entry.get("path") == component_path:
            args = entry.get("args", {})
            return args if isinstance(args, dict) else None
    return None


def has_variable_references(value: object) -> bool:
    """Whether any string in ``value`` (nested dicts and lists, keys too) holds ``{`` or ``}``:
    a FLARE variable reference, whether FLARE filled it in or (an unknown name) left it."""
    if isinstance(value, str):
        return "{" in value or "}" in value
    if isinstance(value, dict):
        return any(
            has_variable_references(k) or has_variable_references(v) for k, v in value.items()
        )
    if isinstance(value, list | tuple):
        return any(has_variable_references(v) for v in value)
    return False
