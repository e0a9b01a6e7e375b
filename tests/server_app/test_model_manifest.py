"""The signed model manifest: keys from FLARE's own provisioning; every change is detected."""

import base64
import json
from pathlib import Path

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from nvflare.lighter.prov_utils import prepare_builders, prepare_packager
from nvflare.lighter.provision import prepare_project
from nvflare.lighter.provisioner import Provisioner

from fedseg.cli import main
from server_app.model_manifest import (
    ManifestError,
    Signer,
    SignerKind,
    load_provisioned_signer,
    manifest_paths,
    simulation_signer,
    verify_model,
    write_signed_manifest,
)
from tests.conftest import tiny_spec

SPEC = tiny_spec().to_plain()


def _provision(workspace: Path, project: str) -> Path:
    """Startup kits for server1, site-1 and an admin, by FLARE's provisioner; returns the
    project's kit folder (``<participant>/startup/...``)."""
    project_dict = {
        "api_version": 3,
        "name": project,
        "description": "fedseg manifest test",
        "participants": [
            {"name": "server1", "type": "server", "org": "h", "fed_learn_port": 8002},
            {"name": "site-1", "type": "client", "org": "h"},
            {"name": "admin@h.org", "type": "admin", "org": "h", "role": "project_admin"},
        ],
        "builders": [
            {
                "path": "nvflare.lighter.impl.workspace.WorkspaceBuilder",
                "args": {"template_file": ["master_template.yml"]},
            },
            {"path": "nvflare.lighter.impl.static_file.StaticFileBuilder"},
            {"path": "nvflare.lighter.impl.cert.CertBuilder"},
        ],
    }
    Provisioner(
        str(workspace), prepare_builders(project_dict), prepare_packager(project_dict)
    ).provision(prepare_project(project_dict))
    return next(workspace.glob(f"{project}/prod_*"))


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    root = tmp_path_factory.mktemp("provision")
    return _provision(root / "ours", "fedseg-ours"), _provision(root / "other", "fedseg-other")


def _signed_model(folder: Path, signer) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "final_model.pt"
    torch.save({"conv.weight": torch.arange(8.0)}, model)
    write_signed_manifest(
        model,
        spec=SPEC,
        contributing_sites=["site-2", "site-1"],
        epsilon_per_site={"site-1": 3.5, "site-2": 4.25},
        rounds_completed=2,
        signer=signer,
    )
    return model


def test_manifest_records_hashes_sites_epsilon_and_the_signer(kits, tmp_path):
    signer = load_provisioned_signer(kits[0] / "server1" / "startup")
    model = _signed_model(tmp_path, signer)
    manifest_path, signature_path = manifest_paths(model)
    assert manifest_path.name == "final_model.manifest.json"
    assert signature_path.name == "final_model.manifest.sig"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["contributing_sites"] == ["site-1", "site-2"]
    assert manifest["epsilon_per_site"] == {"site-1": 3.5, "site-2": 4.25}
    assert manifest["rounds_completed"] == 2 and manifest["job"] == "tiny"
    assert manifest["fedseg_version"] == "0.1.0"
    assert len(manifest["spec_sha256"]) == len(manifest["code_sha256"]) == 64
    assert manifest["signer"]["kind"] == "provisioned"
    assert manifest["signer"]["subject"] == "server1"
    assert manifest["created_utc"].endswith("Z")


def test_a_provisioned_signature_verifies_against_the_kits_root_ca(kits, tmp_path):
    model = _signed_model(tmp_path, load_provisioned_signer(kits[0] / "server1" / "startup"))
    result = verify_model(
        model, root_ca=kits[0] / "site-1" / "startup" / "rootCA.pem", signer_name="server1"
    )
    assert result.ok, result.problems
    assert not result.simulation
    assert verify_model(model, spec=SPEC).ok
    assert (
        "spec" in verify_model(model, spec=tiny_spec(training={"lr": 0.5}).to_plain()).problems[0]
    )


def test_a_startup_folder_without_server_keys_gives_no_signer(tmp_path):
    assert load_provisioned_signer(tmp_path) is None
    (tmp_path / "server.key").write_text("x")
    with pytest.raises(ManifestError, match=r"only one of server\.key and server\.crt"):
        load_provisioned_signer(tmp_path)


def test_changed_weights_are_detected(tmp_path):
    model = _signed_model(tmp_path, simulation_signer())
    data = bytearray(model.read_bytes())
    data[-20] ^= 0x01  # one bit
    model.write_bytes(bytes(data))
    result = verify_model(model)
    assert not result.ok
    assert result.problems == [result.problems[0]] and result.problems[0].startswith("weights:")


def test_a_changed_manifest_is_detected(tmp_path):
    model = _signed_model(tmp_path, simulation_signer())
    manifest_path, _ = manifest_paths(model)
    manifest_path.write_text(manifest_path.read_text().replace("4.25", "0.25"))
    problems = verify_model(model).problems
    assert len(problems) == 1 and problems[0].startswith("signature:")


def test_a_changed_signature_is_detected(tmp_path):
    model = _signed_model(tmp_path, simulation_signer())
    _, signature_path = manifest_paths(model)
    signature = bytearray(base64.b64decode(signature_path.read_text()))
    signature[0] ^= 0x80
    signature_path.write_text(base64.b64encode(bytes(signature)).decode())
    problems = verify_model(model).problems
    assert len(problems) == 1 and problems[0].startswith("signature:")


def test_a_swapped_certificate_is_detected(kits, tmp_path):
    model = _signed_model(tmp_path, simulation_signer())
    manifest_path, _ = manifest_paths(model)
    manifest = json.loads(manifest_path.read_text())
    other = (kits[0] / "server1" / "startup" / "server.crt").read_text()
    manifest["signer"]["certificate_pem"] = other
    manifest_path.write_text(json.dumps(manifest, sort_keys=True, indent=2) + "\n")
    problems = verify_model(model).problems
    assert len(problems) == 1 and problems[0].startswith("signature:")


def test_a_re_signed_manifest_passes_alone_but_not_against_the_root_ca_or_signer(kits, tmp_path):
    """Whoever re-signs with their own key makes a self-consistent manifest: only the root CA
    (another federation's server) or the signer name (a site of ours) catches it."""
    ours, other = kits
    root_ca = ours / "server1" / "startup" / "rootCA.pem"
    foreign = _signed_model(tmp_path / "a", load_provisioned_signer(other / "server1" / "startup"))
    assert verify_model(foreign).ok
    problems = verify_model(foreign, root_ca=root_ca).problems
    assert len(problems) == 1 and "not issued by the root CA" in problems[0]

    site = ours / "site-1" / "startup"
    site_signer = Signer(
        private_key=serialization.load_pem_private_key(
            (site / "client.key").read_bytes(), password=None
        ),
        certificate=x509.load_pem_x509_certificate((site / "client.crt").read_bytes()),
        kind=SignerKind.PROVISIONED,
    )
    by_site = _signed_model(tmp_path / "b", site_signer)
    assert verify_model(by_site, root_ca=root_ca).ok  # the site is certified by the same root
    problems = verify_model(by_site, root_ca=root_ca, signer_name="server1").problems
    assert problems == ["certificate: the manifest was signed by 'site-1', not by 'server1'"]


def test_a_simulation_signature_says_so_and_fails_against_a_root_ca(kits, tmp_path):
    model = _signed_model(tmp_path, simulation_signer())
    result = verify_model(model)
    assert result.ok and result.simulation
    assert any(note.startswith("simulation signature") for note in result.notes)
    assert not verify_model(model, root_ca=kits[0] / "server1" / "startup" / "rootCA.pem").ok


def test_verify_command_exit_codes(kits, tmp_path, capsys):
    model = _signed_model(tmp_path, load_provisioned_signer(kits[0] / "server1" / "startup"))
    root_ca = str(kits[0] / "server1" / "startup" / "rootCA.pem")
    assert main(["model", "verify", str(model), "--root-ca", root_ca, "--signer", "server1"]) == 0
    assert "verified" in capsys.readouterr().out
    model.write_bytes(model.read_bytes() + b"\0")
    assert main(["model", "verify", str(model)]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "weights: sha256 of final_model.pt" in err
    assert main(["model", "verify", str(tmp_path / "missing.pt")]) == 2
    assert "model file not found" in capsys.readouterr().err
