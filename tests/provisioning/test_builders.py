"""What fedseg's provisioning builders write into every kit: exactly fedseg's components per
side, no shell and no log streaming, the server's job store in its workspace, and the rights
table that docs/project-admin.md shows."""

import json
import re
from pathlib import Path

import pytest
import yaml

from jobs.components import SERVER_COMPONENTS, SITE_COMPONENTS
from jobs.spec import load_spec, parse_spec
from provisioning.builders import AUTHORIZATION, SERVER_WORKSPACE_ENV
from provisioning.provision import provision, template_text
from researcher_app.flare_job import build_job

DOC = Path("docs/project-admin.md")


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("builders")
    project = tmp / "project.yml"
    project.write_text(template_text())
    return provision(project, tmp / "kits")


def _resources(kit: Path) -> dict:
    return json.loads((kit / "local" / "resources.json").read_text())


def test_each_side_allows_exactly_fedseg_s_components(federation):
    assert _resources(federation.server_kit)["class_allow_list"] == list(SERVER_COMPONENTS)
    for kit in federation.sites.values():
        resources = _resources(kit)
        assert resources["class_allow_list"] == list(SITE_COMPONENTS)
        assert resources["class_list_enforcement_mode"] == "enforce"
        # no prefix entries: a prefix ("site_app.") admits every callable of the package
        assert not [entry for entry in resources["class_allow_list"] if entry.endswith(".")]


def test_the_job_fedseg_builds_uses_only_the_allowed_components(tmp_path):
    # Every optional component on (tracking.mlflow), so the job uses the whole allow-list.
    spec = parse_spec(
        {**load_spec("jobs/specs/demo.yaml").to_plain(), "tracking": {"mlflow": True}}
    )
    build_job(spec, sites=["site-1"]).export_job(str(tmp_path))
    job = next(tmp_path.iterdir())

    def paths(config: dict) -> set[str]:
        found = {e["executor"]["path"] for e in config.get("executors", [])}
        found |= {e["path"] for e in [*config.get("workflows", []), *config["components"]]}
        return found

    server = json.loads((job / "app_server" / "config" / "config_fed_server.json").read_text())
    site = json.loads((job / "app_site-1" / "config" / "config_fed_client.json").read_text())
    assert paths(server) == set(SERVER_COMPONENTS)
    assert paths(site) == set(SITE_COMPONENTS)
    # The executor's one argument is the spec: nothing about the site's config or mode.
    assert list(site["executors"][0]["executor"]["args"]) == ["spec"]


def test_sites_do_not_stream_logs_to_the_server(federation):
    for kit in federation.sites.values():
        resources = _resources(kit)
        assert resources["allow_log_streaming"] is False
        assert not [c for c in resources["components"] if "LogStreamer" in c["path"]]


def test_the_server_keeps_its_job_store_in_its_workspace(federation):
    resources = _resources(federation.server_kit)
    job_manager = next(c for c in resources["components"] if c["id"] == "job_manager")
    workspace = "{$" + SERVER_WORKSPACE_ENV + "}"
    assert job_manager["args"]["uri_root"] == f"{workspace}/jobs-storage"
    storage = resources["snapshot_persistor"]["args"]["storage"]["args"]
    assert storage["root_dir"] == f"{workspace}/snapshot-storage"
    # ... which the kit's own (signed) start script exports before starting the server.
    script = (federation.server_kit / "startup" / "sub_start.sh").read_text()
    export = f'export {SERVER_WORKSPACE_ENV}="$WORKSPACE"'
    assert export in script
    assert script.index(export) < script.index("start_python()")


def test_provisioning_writes_the_rights_table(federation):
    for kit in [federation.server_kit, *federation.sites.values()]:
        written = json.loads((kit / "local" / "authorization.json").read_text())
        assert written == AUTHORIZATION


def _documented_rights() -> dict[str, dict[str, str]]:
    """The "Who can do what" table of docs/project-admin.md as {role: {right: value}}."""
    section = DOC.read_text().split("## Who can do what", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    header = next(line for line in section.splitlines() if line.startswith("| right |"))
    roles = re.findall(r"`(\w+)`", header)
    table: dict[str, dict[str, str]] = {role: {} for role in roles}
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        right = cells[0].strip("`")
        for role, cell in zip(roles, cells[2:], strict=True):
            table[role][right] = cell.strip("`")
    return table


def test_the_documented_rights_are_the_provisioned_rights():
    documented = _documented_rights()
    assert sorted(documented) == sorted(AUTHORIZATION["permissions"])
    for role, rights in AUTHORIZATION["permissions"].items():
        # A right a role's entry leaves out is "none" in FLARE.
        provisioned = {
            right: value for right, value in rights.items() if right != "server-predeployed-flwr"
        }
        for right, value in documented[role].items():
            assert provisioned.get(right, "none") == value, (role, right)
        assert set(provisioned) <= set(documented[role]), (role, set(provisioned))


def test_no_role_has_a_shell_and_a_lead_cannot_operate():
    permissions = AUTHORIZATION["permissions"]
    assert {rights.get("shell_commands", "none") for rights in permissions.values()} == {"none"}
    assert permissions["lead"]["operate"] == "none"


def test_the_project_template_still_provisions_what_the_docs_say(federation):
    project = yaml.safe_load(template_text())
    roles = {p["role"] for p in project["participants"] if p["type"] == "admin"}
    assert roles == set(AUTHORIZATION["permissions"])
