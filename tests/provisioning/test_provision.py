"""FLARE provisioning with fedseg's builders, and the site kit preflight (no processes)."""

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from provisioning.builders import AUTHORIZATION
from provisioning.provision import ProvisioningError, provision, template_text
from site_app.kit_check import Outcome, check_kit
from site_app.site_config import load_site_config


def _project(tmp_path: Path, edit=None, name: str = "project.yml") -> Path:
    project = yaml.safe_load(template_text())
    if edit is not None:
        edit(project)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(project, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prov")
    return provision(_project(tmp), tmp / "kits")


def test_every_participant_gets_a_signed_kit_with_fedseg_local_files(federation):
    assert sorted(federation.sites) == ["site-1", "site-2"]
    roles = sorted(role for role, _ in federation.admins.values())
    assert roles == ["lead", "member", "org_admin", "project_admin"]
    kits = [federation.server_kit, *federation.sites.values()]
    kits += [kit for _, kit in federation.admins.values()]
    for kit in kits:
        assert (kit / "startup" / "signature.json").is_file(), kit
        assert (kit / "startup" / "rootCA.pem").is_file(), kit
    for kit in [federation.server_kit, *federation.sites.values()]:
        local = kit / "local"
        assert json.loads((local / "authorization.json").read_text()) == AUTHORIZATION
        resources = json.loads((local / "resources.json").read_text())
        assert resources["class_list_enforcement_mode"] == "enforce"
        assert {"jobs.", "site_app.", "server_app."} <= set(resources["class_allow_list"])
        assert json.loads((local / "privacy.json").read_text())["default_scope"] == "fedseg"


def test_site_config_carries_the_projects_privacy_policy(federation):
    config = load_site_config(federation.sites["site-1"] / "local" / "fedseg_site.yaml")
    assert config.policy.dp_required is True
    assert config.policy.max_epsilon_per_job == 8.0
    assert config.policy.total_epsilon_budget == 20.0
    assert config.policy.min_noise_multiplier == 0.5


def test_nobody_may_run_custom_code_and_only_admins_and_leads_submit():
    permissions = AUTHORIZATION["permissions"]
    assert all(rights["byoc"] == "none" for rights in permissions.values())
    submitters = [role for role, rights in permissions.items() if rights.get("submit_job") == "any"]
    assert sorted(submitters) == ["lead", "project_admin"]


def test_per_site_overrides_reach_that_site_only(tmp_path):
    def edit(project):
        builder = next(b for b in project["builders"] if b["path"].endswith("FedsegSiteBuilder"))
        builder["args"]["sites"] = {"site-2": {"policy": {"max_epsilon_per_job": 2.0}}}

    federation = provision(_project(tmp_path, edit), tmp_path / "kits")
    site_1 = load_site_config(federation.sites["site-1"] / "local" / "fedseg_site.yaml")
    site_2 = load_site_config(federation.sites["site-2"] / "local" / "fedseg_site.yaml")
    assert (site_1.policy.max_epsilon_per_job, site_2.policy.max_epsilon_per_job) == (8.0, 2.0)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda p: p["participants"].__setitem__(
                -1, {**p["participants"][-1], "role": "superuser"}
            ),
            "role must be one of",
        ),
        (
            lambda p: p.__setitem__("builders", p["builders"][:-1]),
            "StartupSigningBuilder is missing",
        ),
        (
            lambda p: p.__setitem__(
                "participants", [x for x in p["participants"] if x["type"] != "client"]
            ),
            "at least one site",
        ),
        (
            lambda p: next(b for b in p["builders"] if b["path"].endswith("FedsegSiteBuilder"))[
                "args"
            ].__setitem__("sites", {"site-9": {}}),
            "site-9",
        ),
        (
            lambda p: next(b for b in p["builders"] if b["path"].endswith("FedsegSiteBuilder"))[
                "args"
            ]["policy"].__setitem__("max_epsilon_per_job", -1),
            "max_epsilon_per_job",
        ),
    ],
    ids=["bad-role", "unsigned", "no-sites", "unknown-site-override", "bad-policy"],
)
def test_bad_project_files_are_refused_naming_the_problem(tmp_path, edit, expected):
    with pytest.raises(ProvisioningError, match=expected):
        provision(_project(tmp_path, edit), tmp_path / "kits")


def test_a_missing_project_file_says_how_to_make_one(tmp_path):
    with pytest.raises(ProvisioningError, match="--write-template"):
        provision(tmp_path / "nope.yml", tmp_path / "kits")


# -- site kit preflight ------------------------------------------------------------------------


@pytest.fixture
def site_kit(federation, tmp_path, tiny_federation):
    kit = tmp_path / "site-1"
    shutil.copytree(federation.sites["site-1"], kit)
    config = kit / "local" / "fedseg_site.yaml"
    data = yaml.safe_load(config.read_text())
    data["data_dir"] = str(tiny_federation / "site-1")
    data["cache_dir"] = str(tmp_path / "cache")
    config.write_text(yaml.safe_dump(data))
    return kit


def _outcomes(results):
    return {result.item: result for result in results}


def test_a_fresh_kit_passes_everything_but_the_unreachable_server(site_kit):
    results = _outcomes(check_kit(site_kit, timeout_s=0.5))
    for item in ("kit complete", "kit signature", "certificate", "data", "privacy policy"):
        assert results[item].outcome is Outcome.PASS, results[item]
    assert "3 usable patient(s)" in results["data"].detail
    # Nothing listens on the template's port here: the check names host, port and the fix.
    assert results["server address"].outcome is Outcome.FAIL
    assert "localhost:8002" in results["server address"].detail
    assert "budget left 20" in results["epsilon ledger"].detail


def test_an_altered_startup_file_is_caught(site_kit):
    config = site_kit / "startup" / "fed_client.json"
    data = json.loads(config.read_text())
    data["servers"][0]["service"]["target"] = "attacker.example.org:8002"
    config.write_text(json.dumps(data))
    result = _outcomes(check_kit(site_kit, timeout_s=0.5))["kit signature"]
    assert result.outcome is Outcome.FAIL
    assert "changed after provisioning" in result.detail


def test_a_certificate_from_another_provisioning_is_caught(site_kit, tmp_path):
    other = provision(_project(tmp_path, name="other.yml"), tmp_path / "other_kits")
    shutil.copy(other.sites["site-1"] / "startup" / "client.crt", site_kit / "startup")
    results = _outcomes(check_kit(site_kit, timeout_s=0.5))
    assert results["certificate"].outcome is Outcome.FAIL
    assert "not issued by this kit's rootCA.pem" in results["certificate"].detail
    assert results["kit signature"].outcome is Outcome.FAIL  # the swap also breaks the signature


def test_an_expired_certificate_is_caught(site_kit):
    later = datetime.now(UTC) + timedelta(days=400)
    result = _outcomes(check_kit(site_kit, timeout_s=0.5, now=later))["certificate"]
    assert result.outcome is Outcome.FAIL and "expired" in result.detail


def test_a_missing_data_folder_and_an_incomplete_kit_name_the_fix(site_kit):
    config = site_kit / "local" / "fedseg_site.yaml"
    data = yaml.safe_load(config.read_text())
    data["data_dir"] = "/nonexistent/dicom"
    config.write_text(yaml.safe_dump(data))
    result = _outcomes(check_kit(site_kit, timeout_s=0.5))["data"]
    assert result.outcome is Outcome.FAIL and "data_dir" in result.fix
    (site_kit / "startup" / "client.key").unlink()
    result = check_kit(site_kit, timeout_s=0.5)
    assert result[-1].outcome is Outcome.FAIL and "startup/client.key" in result[-1].detail


# -- the commands ------------------------------------------------------------------------------


def test_provision_commands_write_a_template_and_kits_or_name_the_problem(tmp_path, capsys):
    from fedseg.cli import main

    template = tmp_path / "project.yml"
    assert main(["provision", "--write-template", str(template)]) == 0
    assert main(["provision", "--write-template", str(template)]) == 2  # never overwritten
    assert main(["provision", "--project", str(template), "--out", str(tmp_path / "kits")]) == 0
    assert "researcher@hospital-a.org" in capsys.readouterr().out
    template.write_text(template.read_text().replace("role: lead", "role: boss"))
    assert main(["provision", "--project", str(template), "--out", str(tmp_path / "k2")]) == 2
    assert "role must be one of" in capsys.readouterr().err


def test_site_check_kit_exits_1_and_names_what_to_fix(site_kit, capsys):
    from fedseg.cli import main

    assert main(["site", "check", "--kit", str(site_kit)]) == 1
    captured = capsys.readouterr()
    assert "pass kit signature" in captured.out
    assert "fail server address" in captured.out and "fix:" in captured.out
    assert "not ready" in captured.err and "server address" in captured.err
