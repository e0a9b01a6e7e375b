"""FLARE provisioning builders that add what fedseg needs to every startup kit.

They run inside FLARE's own provisioner (listed under ``builders:`` in the project file, after
FLARE's ``CertBuilder``), so certificates, mutual TLS and the kit layout stay FLARE's:

- :class:`FedsegSiteBuilder` writes each participant's ``local/`` files: the fedseg site config
  (data path, privacy policy), FLARE's ``authorization.json`` (who may submit and run jobs;
  custom code and shell commands forbidden for every role), ``resources.json`` (the component
  allow-list admits exactly fedseg's components for that side, ``jobs.components``; sites do
  not stream their logs to the server; the server keeps its job store in its own workspace) and
  ``privacy.json``.
- :class:`StartupSigningBuilder` signs every participant's ``startup/`` folder with the
  project's root CA key (FLARE's ``sign_folders``). FLARE verifies that signature when a server,
  site or admin console starts and refuses to run a kit whose startup files were changed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml
from nvflare.app_common.logging.constants import ALLOW_LOG_STREAMING_VAR
from nvflare.app_common.widgets.component_path_authorizer import (
    CLASS_ALLOW_LIST,
    CLASS_LIST_ENFORCEMENT_MODE,
)
from nvflare.lighter.constants import CtxKey, ProvFileName
from nvflare.lighter.entity import Participant
from nvflare.lighter.spec import Builder, Project, ProvisionContext
from nvflare.lighter.utils import sign_folders

from jobs.components import SERVER_COMPONENTS, SITE_COMPONENTS
from jobs.kit_layout import SITE_CONFIG_FILE

__all__ = [
    "AUTHORIZATION",
    "SERVER_WORKSPACE_ENV",
    "FedsegSiteBuilder",
    "StartupSigningBuilder",
]


SERVER_WORKSPACE_ENV = "FEDSEG_SERVER_WORKSPACE"
"""Exported by the server kit's ``startup/sub_start.sh`` (fedseg adds the line before signing):
the server's workspace, where its ``resources.json`` keeps FLARE's job and snapshot stores."""

# Rights per role at every site and at the server (FLARE's authorization.json format). Nobody may
# run custom code ("byoc": "none"): a fedseg job is configuration; the code is the installed
# package. Nobody has a shell into any participant ("shell_commands": "none"): FLARE's ls, cat,
# head, tail and grep would read a site's files. Only the project admin and leads (researchers)
# submit jobs; org admins operate their own site; members only view. Documented, and compared
# with this table by a test, in docs/project-admin.md ("Who can do what").
_NO_CUSTOM_CODE = {"byoc": "none", "server-predeployed-flwr": "none"}
AUTHORIZATION = {
    "format_version": "1.0",
    "permissions": {
        "project_admin": {
            "submit_job": "any",
            "clone_job": "any",
            "manage_job": "any",
            "download_job": "any",
            "view": "any",
            "operate": "any",
            "shell_commands": "none",
            "app_command": "any",
            **_NO_CUSTOM_CODE,
        },
        "org_admin": {
            "submit_job": "none",
            "clone_job": "none",
            "manage_job": "o:submitter",
            "download_job": "o:submitter",
            "view": "any",
            "operate": "o:site",
            "shell_commands": "none",
            "app_command": "o:submitter",
            **_NO_CUSTOM_CODE,
        },
        "lead": {
            "submit_job": "any",
            "clone_job": "n:submitter",
            "manage_job": "n:submitter",
            "download_job": "n:submitter",
            "view": "any",
            "operate": "none",
            "shell_commands": "none",
            "app_command": "n:submitter",  # `fedseg job status` asks its own running jobs
            **_NO_CUSTOM_CODE,
        },
        "member": {"view": "any", **_NO_CUSTOM_CODE},
    },
}

# FLARE's privacy scopes apply result filters to what leaves a site. fedseg's DP happens inside
# training (Opacus), governed by the site's fedseg policy, so the one scope adds no filter; a job
# asking for any other scope is refused by FLARE.
PRIVACY = {
    "scopes": [{"name": "fedseg", "properties": {}, "task_result_filters": []}],
    "default_scope": "fedseg",
}


_LOG_STREAMER = "nvflare.app_common.logging.site_log_streamer.SiteLogStreamer"


def _site_resources(default_resources: Path) -> dict:
    """FLARE's default client resources.json with the allow-list narrowed to exactly fedseg's
    site components (enforced) and no log streaming: a site's logs stay at the site (FLARE's
    ``SiteLogStreamer`` would add a log streamer to every job; with streaming off FLARE also
    strips one a job declares). A site admin may opt in by editing this file."""
    resources = json.loads(default_resources.read_text()) if default_resources.is_file() else {}
    resources["format_version"] = 2
    resources[CLASS_LIST_ENFORCEMENT_MODE] = "enforce"
    resources[CLASS_ALLOW_LIST] = list(SITE_COMPONENTS)
    resources[ALLOW_LOG_STREAMING_VAR] = False
    resources["components"] = [
        c for c in resources.get("components", []) if c.get("path") != _LOG_STREAMER
    ]
    return resources


def _server_resources(default_resources: Path) -> dict:
    """FLARE's default server resources.json with the allow-list narrowed to exactly fedseg's
    server components (enforced), and the job and snapshot stores in the server's workspace
    instead of FLARE's default under /tmp (world-readable on most machines, and shared by every
    server there). The path is the workspace the kit's start script exports at run time
    (``SERVER_WORKSPACE_ENV``), so the kit may be installed anywhere."""
    resources = json.loads(default_resources.read_text()) if default_resources.is_file() else {}
    resources["format_version"] = 2
    resources[CLASS_LIST_ENFORCEMENT_MODE] = "enforce"
    resources[CLASS_ALLOW_LIST] = list(SERVER_COMPONENTS)
    workspace = "{$" + SERVER_WORKSPACE_ENV + "}"
    for component in resources.get("components", []):
        if component.get("id") == "job_manager":
            component.setdefault("args", {})["uri_root"] = f"{workspace}/jobs-storage"
    storage = resources.get("snapshot_persistor", {}).get("args", {}).get("storage", {})
    if "args" in storage:
        storage["args"]["root_dir"] = f"{workspace}/snapshot-storage"
    return resources


_EXPORT_LINE = 'export {name}="$WORKSPACE"  # fedseg: where resources.json keeps the job store\n'


def _export_server_workspace(sub_start: Path) -> None:
    """Make the server's start script export its workspace for ``_server_resources``' paths
    (before ``startup/`` is signed)."""
    text = sub_start.read_text()
    anchor = "export MALLOC_ARENA_MAX"
    if anchor not in text:
        raise RuntimeError(
            f"{sub_start}: FLARE's server start script changed (no {anchor!r} line); fedseg "
            "cannot place the job store in the server's workspace"
        )
    line = _EXPORT_LINE.format(name=SERVER_WORKSPACE_ENV)
    if line not in text:
        sub_start.write_text(text.replace(anchor, line + anchor, 1))


class FedsegSiteBuilder(Builder):
    """Writes fedseg's site config and FLARE's local policy files into each kit.

    Args:
        data_dir: default folder of a site's DICOM (the site admin edits it in
            ``local/fedseg_site.yaml`` after installing the kit).
        policy: default privacy policy for every site (``site_app.policy.PrivacyPolicy`` fields).
        sites: per-site overrides, ``{site name: {data_dir: ..., policy: {...}, ...}}``.
    """

    def __init__(
        self,
        data_dir: str = "/data/dicom",
        policy: dict | None = None,
        sites: dict | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.policy = dict(policy or {})
        self.sites = dict(sites or {})

    def initialize(self, project: Project, ctx: ProvisionContext) -> None:
        names = {p.name for p in project.get_clients()}
        unknown = sorted(set(self.sites) - names)
        if unknown:
            raise ValueError(
                f"FedsegSiteBuilder.sites names {unknown}, which are not client participants "
                f"of the project ({sorted(names)}); fix the names under builders: sites:"
            )
        from site_app.site_config import SiteConfig  # validate the config we are about to write

        for participant in project.get_clients():
            SiteConfig.model_validate(self._site_config(participant))

    def _site_config(self, participant: Participant) -> dict:
        override = dict(self.sites.get(participant.name, {}))
        policy = {**self.policy, **override.pop("policy", {})}
        return {"data_dir": self.data_dir, "policy": policy, **override}

    def build(self, project: Project, ctx: ProvisionContext) -> None:
        server = project.get_server()
        participants = [server, *project.get_clients()]
        for participant in participants:
            local = Path(ctx.get_local_dir(participant))
            default_resources = local / "resources.json.default"
            resources = (
                _server_resources(default_resources)
                if participant is server
                else _site_resources(default_resources)
            )
            (local / "resources.json").write_text(json.dumps(resources, indent=2))
            (local / "authorization.json").write_text(json.dumps(AUTHORIZATION, indent=2))
            (local / "privacy.json").write_text(json.dumps(copy.deepcopy(PRIVACY), indent=2))
        for participant in project.get_clients():
            local = Path(ctx.get_local_dir(participant))
            text = (
                "# fedseg site config: the site admin owns this file (see docs/site-admin.md).\n"
                "# data_dir: the site's DICOM folder; policy: what this site allows.\n"
                + yaml.safe_dump(self._site_config(participant), sort_keys=False)
            )
            (local / SITE_CONFIG_FILE).write_text(text)
        _export_server_workspace(Path(ctx.get_kit_dir(server)) / "sub_start.sh")  # startup/
        # The server's model store: the only place it reads a spec's model.init weights from.
        models = Path(ctx.get_local_dir(server)) / "models"
        models.mkdir(exist_ok=True)
        (models / "README.txt").write_text(
            "Weights a job spec may start from (model.init: {file, sha256}). The server reads\n"
            "them from this folder only and refuses a file whose sha256 differs from the spec's.\n"
            "Put here only weights the federation agreed on (e.g. a public pretrained model).\n"
        )


class StartupSigningBuilder(Builder):
    """Signs each participant's ``startup/`` folder with the root CA key (FLARE checks it at start).

    Must come after every builder that writes into ``startup/``. ``local/`` stays unsigned:
    it is the site admin's to edit (data path, policy, authorization).
    """

    def build(self, project: Project, ctx: ProvisionContext) -> None:
        root_key = ctx.get(CtxKey.ROOT_PRI_KEY)
        if root_key is None:
            raise RuntimeError(
                "StartupSigningBuilder needs the root CA key: list it after "
                "nvflare.lighter.impl.cert.CertBuilder in the project's builders"
            )
        for participant in project.get_all_participants():
            sign_folders(
                ctx.get_kit_dir(participant),
                root_key,
                signature_file=ProvFileName.SIGNATURE_JSON,
            )
