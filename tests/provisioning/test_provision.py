"""FLARE provisioning with fedseg's builders, and the site kit preflight (no processes)."""

import hashlib
import json
import shutil
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from nvflare.lighter.constants import ProvFileName
from nvflare.lighter.utils import sign_folders

from provisioning.builders import AUTHORIZATION
from provisioning.provision import ProvisioningError, provision, template_text
from site_app.kit_check import Outcome, check_kit, format_sha256
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
        assert resources["class_allow_list"]  # exactly fedseg's components: test_builders.py
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


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_keys_and_their_folders_are_owner_only(federation):
    state = federation.kits_dir.parent / "state"
    assert (_mode(state), _mode(state / "cert.json")) == (0o700, 0o600)
    keys = sorted(federation.kits_dir.rglob("*.key"))
    assert len(keys) == 1 + len(federation.sites) + len(federation.admins)
    for key in keys:
        assert (_mode(key), _mode(key.parent)) == (0o600, 0o700), key
    assert not [p for p in federation.kits_dir.parent.rglob("rootCA.key") if _mode(p) != 0o600]


def test_the_root_ca_fingerprint_is_the_sha256_of_the_projects_root_certificate(federation):
    cert_json = json.loads((federation.kits_dir.parent / "state" / "cert.json").read_text())
    root = x509.load_pem_x509_certificate(cert_json["root_cert"].encode())
    expected = hashlib.sha256(root.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert federation.root_ca_sha256 == expected


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


def test_a_fresh_kit_passes_everything_but_the_unreachable_server(site_kit, federation):
    fingerprint = format_sha256(federation.root_ca_sha256).lower()  # as read out: colons
    results = _outcomes(check_kit(site_kit, root_ca_sha256=fingerprint, timeout_s=0.5))
    items = ("kit complete", "root CA", "kit signature", "certificate", "data", "privacy policy")
    for item in items:
        assert results[item].outcome is Outcome.PASS, results[item]
    assert "3 usable patient(s)" in results["data"].detail
    # Nothing listens on the template's port here: the check names host, port and the fix.
    assert results["server address"].outcome is Outcome.FAIL
    assert "localhost:8002" in results["server address"].detail
    assert "budget left 20" in results["epsilon ledger"].detail


def test_without_the_fingerprint_the_root_ca_is_a_warning_saying_how_to_anchor_it(site_kit):
    result = _outcomes(check_kit(site_kit, timeout_s=0.5))["root CA"]
    assert result.outcome is Outcome.WARN and "not anchored" in result.detail
    assert "--root-ca-sha256" in result.fix and "fedseg provision" in result.fix


def test_a_deleted_signature_fails(site_kit):
    (site_kit / "startup" / ProvFileName.SIGNATURE_JSON).unlink()
    result = _outcomes(check_kit(site_kit, timeout_s=0.5))["kit signature"]
    assert result.outcome is Outcome.FAIL and "signature.json is missing" in result.detail


def _ca(common_name: str) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def _issue(ca_key, ca_cert: x509.Certificate, common_name: str):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=365))
        .sign(ca_key, hashes.SHA256())
    )
    return key, certificate


def _pem(item) -> bytes:
    if isinstance(item, x509.Certificate):
        return item.public_bytes(serialization.Encoding.PEM)
    return item.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def test_a_kit_re_signed_under_a_swapped_root_ca_fails_only_against_the_fingerprint(
    site_kit, federation
):
    """The attack: whoever can write the kit on its way replaces the root CA, issues the site a
    new certificate, points it at their own server (which mTLS would now trust) and re-signs
    startup/ with FLARE's own signing. Every check that trusts the kit's own rootCA.pem
    passes; only the fingerprint the project admin gave by phone catches it."""
    startup = site_kit / "startup"
    ca_key, ca_cert = _ca("fedseg_federation")
    client_key, client_cert = _issue(ca_key, ca_cert, "site-1")
    (startup / "rootCA.pem").write_bytes(_pem(ca_cert))
    (startup / "client.crt").write_bytes(_pem(client_cert))
    (startup / "client.key").write_bytes(_pem(client_key))
    config = json.loads((startup / "fed_client.json").read_text())
    config["servers"][0]["service"]["target"] = "attacker.example.org:8002"
    (startup / "fed_client.json").write_text(json.dumps(config))
    sign_folders(str(startup), ca_key, signature_file=ProvFileName.SIGNATURE_JSON)

    self_check = _outcomes(check_kit(site_kit, timeout_s=0.5))
    assert self_check["kit signature"].outcome is Outcome.PASS  # consistent, and meaningless
    assert self_check["certificate"].outcome is Outcome.PASS
    assert self_check["root CA"].outcome is Outcome.WARN

    anchored = _outcomes(
        check_kit(site_kit, root_ca_sha256=federation.root_ca_sha256, timeout_s=0.5)
    )
    result = anchored["root CA"]
    assert result.outcome is Outcome.FAIL and "replaced" in result.detail
    forged = hashlib.sha256(ca_cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert format_sha256(forged) in result.detail
    assert format_sha256(federation.root_ca_sha256) in result.detail


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
    out = capsys.readouterr().out
    assert "researcher@hospital-a.org" in out
    fingerprint = next(line for line in out.splitlines() if line.startswith("root CA sha256"))
    kit = next((tmp_path / "kits").glob("*/prod_00/site-1"))
    expected = hashlib.sha256(
        x509.load_pem_x509_certificate((kit / "startup" / "rootCA.pem").read_bytes()).public_bytes(
            serialization.Encoding.DER
        )
    ).hexdigest()
    assert fingerprint == f"root CA sha256: {format_sha256(expected)}"
    assert "by phone" in out
    template.write_text(template.read_text().replace("role: lead", "role: boss"))
    assert main(["provision", "--project", str(template), "--out", str(tmp_path / "k2")]) == 2
    assert "role must be one of" in capsys.readouterr().err


def test_site_check_kit_exits_1_and_names_what_to_fix(site_kit, capsys):
    from fedseg.cli import main

    assert main(["site", "check", "--kit", str(site_kit)]) == 1
    captured = capsys.readouterr()
    assert "pass kit signature" in captured.out and "warn root CA: not anchored" in captured.out
    assert "fail server address" in captured.out and "fix:" in captured.out
    assert "not ready" in captured.err and "server address" in captured.err


def test_site_check_kit_takes_the_fingerprint_in_any_case_with_or_without_colons(
    site_kit, federation, capsys
):
    from fedseg.cli import main

    argv = ["site", "check", "--kit", str(site_kit), "--root-ca-sha256"]
    for given in (federation.root_ca_sha256.upper(), format_sha256(federation.root_ca_sha256)):
        main([*argv, given])
        assert "pass root CA" in capsys.readouterr().out
    main([*argv, "00" * 32])
    captured = capsys.readouterr()
    assert "fail root CA" in captured.out and format_sha256("00" * 32) in captured.out
    assert "root CA" in captured.err
    with pytest.raises(SystemExit):
        main([*argv, "not-a-fingerprint"])
    assert "64 hex digits" in capsys.readouterr().err
