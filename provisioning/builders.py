"""FLARE provisioning builders that add what fedseg needs to every startup kit.

They run inside FLARE's own provisioner (listed under ``builders:`` in the project file, after
FLARE's ``CertBuilder``), so certificates, mutual TLS and the kit layout stay FLARE's:

- :class:`FedsegSiteBuilder` writes each participant's ``local/`` files: the fedseg site config
  (data path, privacy policy), FLARE's ``authorization.json`` (who may submit and run jobs;
  custom code forbidden for every role), ``resources.json`` (the component allow-list admits
  only FLARE's defaults and fedseg's installed packages) and ``privacy.json``.
- :class:`StartupSigningBuilder` signs every participant's ``startup/`` folder with the
  project's root CA key (FLARE's ``sign_folders``). FLARE verifies that signature when a server,
  site or admin console starts and refuses to run a kit whose startup files were changed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml
from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST
from nvflare.app_common.widgets.component_path_authorizer import CLASS_ALLOW_LIST
from nvflare.lighter.constants import CtxKey, ProvFileName
from nvflare.lighter.entity import Participant
from nvflare.lighter.spec import Builder, Project, ProvisionContext
from nvflare.lighter.utils import sign_folders

from jobs.flare_job import APP_PACKAGES

__all__ = ["AUTHORIZATION", "FedsegSiteBuilder", "StartupSigningBuilder"]

SITE_CONFIG_FILE = "fedseg_site.yaml"  # same name site_app.site_config reads

# Rights per role at every site and at the server (FLARE's authorization.json format). Nobody may
# run custom code ("byoc": "none"): a fedseg job is configuration; the code is the installed
# package. Only the project admin and leads (researchers) submit jobs; org admins operate their
# own site; members only view.
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
            "shell_commands": "any",
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
            "shell_commands": "o:site",
            "app_command": "o:submitter",
            **_NO_CUSTOM_CODE,
        },
        "lead": {
            "submit_job": "any",
            "clone_job": "n:submitter",
            "manage_job": "n:submitter",
            "download_job": "n:submitter",
            "view": "any",
            "operate": "o:site",
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


def _resources(default_resources: Path) -> dict:
    """FLARE's default resources.json for this kit with the allow-list narrowed to
    FLARE's defaults plus fedseg's packages (enforced)."""
    resources = json.loads(default_resources.read_text()) if default_resources.is_file() else {}
    resources["format_version"] = 2
    resources["class_list_enforcement_mode"] = "enforce"
    resources[CLASS_ALLOW_LIST] = [*DEFAULT_CLASS_ALLOW_LIST, *(f"{p}." for p in APP_PACKAGES)]
    return resources


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
        participants = [project.get_server(), *project.get_clients()]
        for participant in participants:
            local = Path(ctx.get_local_dir(participant))
            default_resources = local / "resources.json.default"
            (local / "resources.json").write_text(
                json.dumps(_resources(default_resources), indent=2)
            )
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
