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
    trust_anchor_from_kit,
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
    anchor = {"root_ca": kits[0] / "site-1" / "startup" / "rootCA.pem", "signer_name": "server1"}
    result = verify_model(model, **anchor)
    assert result.ok, result.problems
    assert not result.simulation and result.verified_signer == "server1"
    assert verify_model(model, spec=SPEC, **anchor).ok
    other_spec = tiny_spec(training={"lr": 0.5}).to_plain()
    assert "spec" in verify_model(model, spec=other_spec, **anchor).problems[0]


@pytest.mark.parametrize("kit", ["site-1", "admin@h.org", "server1"])
def test_any_kit_of_the_federation_names_its_root_ca_and_server(kits, kit):
    root_ca, server = trust_anchor_from_kit(kits[0] / kit)
    assert (root_ca, server) == (kits[0] / kit / "startup" / "rootCA.pem", "server1")


def test_a_folder_that_is_not_a_kit_is_named(tmp_path):
    with pytest.raises(ManifestError, match="not a FLARE startup kit"):
        trust_anchor_from_kit(tmp_path)


def test_a_provisioned_manifest_without_a_root_ca_fails_closed(kits, tmp_path):
    """The embedded certificate alone proves nothing: anyone can make one named 'server1'."""
    model = _signed_model(tmp_path, load_provisioned_signer(kits[0] / "server1" / "startup"))
    result = verify_model(model)
    assert not result.ok and result.verified_signer is None
    assert len(result.problems) == 1 and "pass --kit KIT" in result.problems[0]
    assert "--root-ca" in result.problems[0]


def test_a_manifest_forged_with_a_sites_key_fails_against_the_root_ca(kits, tmp_path):
    """A site's certificate comes from the same root as the server's: with the root CA and no
    server name, the check cannot tell them apart, so it fails; the kit supplies the name."""
    site = kits[0] / "site-1" / "startup"
    site_signer = Signer(
        private_key=serialization.load_pem_private_key(
            (site / "client.key").read_bytes(), password=None
        ),
        certificate=x509.load_pem_x509_certificate((site / "client.crt").read_bytes()),
        kind=SignerKind.PROVISIONED,
    )
    forged = _signed_model(tmp_path, site_signer)
    problems = verify_model(forged, root_ca=site / "rootCA.pem").problems
    assert len(problems) == 1 and "cannot tell the server from a site" in problems[0]
    root_ca, server = trust_anchor_from_kit(kits[0] / "site-1")
    problems = verify_model(forged, root_ca=root_ca, signer_name=server).problems
    assert problems == ["certificate: the manifest was signed by 'site-1', not by 'server1'"]


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


def test_a_manifest_signed_by_another_federations_server_fails_against_our_root_ca(kits, tmp_path):
    """Whoever re-signs with their own provisioned key makes a self-consistent manifest, even
    naming our server: only our root CA catches it."""
    ours, other = kits
    foreign = _signed_model(tmp_path, load_provisioned_signer(other / "server1" / "startup"))
    assert not verify_model(foreign).ok
    root_ca, server = trust_anchor_from_kit(ours / "site-1")
    problems = verify_model(foreign, root_ca=root_ca, signer_name=server).problems
    assert len(problems) == 1 and "not issued by the root CA" in problems[0]


def test_a_simulation_signature_says_so_and_fails_against_a_root_ca(kits, tmp_path):
    model = _signed_model(tmp_path, simulation_signer())
    result = verify_model(model)
    assert result.ok and result.simulation and result.verified_signer is None
    assert any(note.startswith("simulation signature") for note in result.notes)
    assert not verify_model(model, root_ca=kits[0] / "server1" / "startup" / "rootCA.pem").ok


def test_verify_command_exit_codes(kits, tmp_path, capsys):
    model = _signed_model(tmp_path, load_provisioned_signer(kits[0] / "server1" / "startup"))
    root_ca = str(kits[0] / "server1" / "startup" / "rootCA.pem")
    assert main(["model", "verify", str(model), "--root-ca", root_ca, "--signer", "server1"]) == 0
    assert "verified" in capsys.readouterr().out
    assert main(["model", "verify", str(model), "--kit", str(kits[0] / "site-1")]) == 0
    assert "by the federation's server 'server1'" in capsys.readouterr().out
    assert main(["model", "verify", str(model)]) == 1
    assert "pass --kit KIT" in capsys.readouterr().err
    assert main(["model", "verify", str(model), "--root-ca", root_ca]) == 1
    assert "cannot tell the server from a site" in capsys.readouterr().err
    model.write_bytes(model.read_bytes() + b"\0")
    assert main(["model", "verify", str(model)]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "weights: sha256 of final_model.pt" in err
    assert main(["model", "verify", str(tmp_path / "missing.pt")]) == 2
    assert "model file not found" in capsys.readouterr().err


def test_verify_command_says_a_simulation_signature_is_integrity_only(tmp_path, capsys):
    model = _signed_model(tmp_path, simulation_signer())
    assert main(["model", "verify", str(model)]) == 0
    out = capsys.readouterr().out
    assert "integrity only" in out and "SIMULATION signature" in out and "verified" not in out
