"""The signed model manifest: what a model file is, where it came from, and proof it is unchanged.

``final_model.pt`` gets ``final_model.manifest.json`` (sha256 of the weights, of the canonical
spec and of the installed fedseg code; fedseg version; contributing sites; epsilon per site;
rounds; creation time, UTC; the signer's certificate) and ``final_model.manifest.sig``, an RSA-PSS
/ SHA-256 signature of the manifest's bytes (base64). A provisioned server signs with its startup
kit's ``server.key`` (its ``server.crt`` is embedded, and chains to the kit's ``rootCA.pem``); the
simulator has no kit and signs with a throwaway key and a self-signed certificate marked
"simulation", which proves the files are unchanged since signing but not who signed them.

Verification fails closed: a provisioned signature counts only when checked against the
federation's root CA *and* the server's name (FLARE certifies sites and admins with the same
root), both of which any startup kit of the federation supplies (``trust_anchor_from_kit``).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import importlib.metadata
import importlib.util
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

__all__ = [
    "CODE_PACKAGES",
    "ManifestError",
    "Signer",
    "SignerKind",
    "Verification",
    "code_sha256",
    "load_provisioned_signer",
    "manifest_paths",
    "simulation_signer",
    "spec_sha256",
    "trust_anchor_from_kit",
    "verify_model",
    "write_signed_manifest",
]

FORMAT = "fedseg-model-manifest/1"
CODE_PACKAGES = ("jobs", "server_app", "site_app")
"""Packages whose sources ``code_sha256`` covers: everything that trains, aggregates, evaluates."""
SERVER_KEY, SERVER_CERT, ROOT_CA = "server.key", "server.crt", "rootCA.pem"
"""File names FLARE's provisioning writes into the server's ``startup/`` folder."""
SIMULATION_SUBJECT = "fedseg simulation signer (not a provisioned identity)"
CLIENT_CONFIG, ADMIN_CONFIG = "fed_client.json", "fed_admin.json"
"""A site kit's and an admin kit's FLARE connection files; both name the server they trust."""


class ManifestError(Exception):
    """The manifest or its signature cannot be read or written; the message says which file."""


class SignerKind(StrEnum):
    PROVISIONED = "provisioned"
    SIMULATION = "simulation"


@dataclass(frozen=True)
class Signer:
    private_key: rsa.RSAPrivateKey
    certificate: x509.Certificate
    kind: SignerKind


def manifest_paths(model_path: Path) -> tuple[Path, Path]:
    """(manifest, signature) beside ``model_path``: ``x.pt`` -> ``x.manifest.json``,
    ``x.manifest.sig``."""
    model_path = Path(model_path)
    stem = model_path.with_suffix("")
    return stem.with_name(stem.name + ".manifest.json"), stem.with_name(stem.name + ".manifest.sig")


# -- hashes ---------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def spec_sha256(spec: Mapping) -> str:
    """sha256 of the spec as canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def code_sha256(packages: Sequence[str] = CODE_PACKAGES) -> str:
    """sha256 over the installed ``.py`` sources of ``packages`` (relative path and bytes of each
    file, in sorted order). Packages are located without importing them."""
    digest = hashlib.sha256()
    for package in sorted(packages):
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ManifestError(f"package {package!r} is not installed; reinstall fedseg")
        root = Path(next(iter(found.submodule_search_locations)))
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            relative = f"{package}/{path.relative_to(root).as_posix()}"
            digest.update(relative.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def fedseg_version() -> str:
    try:
        return importlib.metadata.version("fedseg")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (fedseg not installed as a package)"


# -- signers --------------------------------------------------------------------------------------


def load_provisioned_signer(startup_dir: Path) -> Signer | None:
    """The server's provisioned key and certificate from a FLARE startup kit, or None when the
    folder has neither (a simulator workspace). Raises ManifestError for half a pair or a key
    that is not RSA."""
    startup_dir = Path(startup_dir)
    key_path, cert_path = startup_dir / SERVER_KEY, startup_dir / SERVER_CERT
    if not key_path.exists() and not cert_path.exists():
        return None
    if not (key_path.is_file() and cert_path.is_file()):
        raise ManifestError(
            f"{startup_dir}: found only one of {SERVER_KEY} and {SERVER_CERT}; the server's "
            "startup kit is incomplete, re-provision it (`fedseg provision`)"
        )
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ManifestError(
            f"{key_path}: expected an RSA key (what FLARE provisioning writes), got "
            f"{type(key).__name__}"
        )
    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return Signer(private_key=key, certificate=certificate, kind=SignerKind.PROVISIONED)


def simulation_signer(now: datetime.datetime | None = None) -> Signer:
    """A fresh RSA key with a self-signed certificate marked as a simulation (kept in memory
    only: once the manifest is signed nobody holds the key)."""
    now = now or datetime.datetime.now(datetime.UTC)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, SIMULATION_SUBJECT),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedseg simulation"),
        ]
    )
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    return Signer(private_key=key, certificate=certificate, kind=SignerKind.SIMULATION)


_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)


def _subject(certificate: x509.Certificate) -> str:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else certificate.subject.rfc4514_string()


# -- writing --------------------------------------------------------------------------------------


def manifest_bytes(manifest: Mapping) -> bytes:
    """The exact bytes that are written and signed (sorted keys, 2-space indent)."""
    return (json.dumps(manifest, sort_keys=True, indent=2) + "\n").encode()


def write_signed_manifest(
    model_path: Path,
    *,
    spec: Mapping,
    contributing_sites: Sequence[str],
    epsilon_per_site: Mapping[str, float | None],
    rounds_completed: int,
    signer: Signer,
    created: datetime.datetime | None = None,
) -> Path:
    """Write and sign the manifest of ``model_path``; return the manifest's path."""
    model_path = Path(model_path)
    created = created or datetime.datetime.now(datetime.UTC)
    privacy = spec.get("privacy") or {}
    manifest = {
        "format": FORMAT,
        "model_file": model_path.name,
        "model_sha256": file_sha256(model_path),
        "job": spec.get("name"),
        "spec_sha256": spec_sha256(spec),
        "fedseg_version": fedseg_version(),
        "code_sha256": code_sha256(),
        "code_packages": list(CODE_PACKAGES),
        "contributing_sites": sorted(contributing_sites),
        "epsilon_per_site": {site: epsilon_per_site.get(site) for site in sorted(epsilon_per_site)},
        "delta": privacy.get("delta") if privacy.get("enabled") else None,
        "rounds_completed": rounds_completed,
        "created_utc": created.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "signer": {
            "kind": signer.kind.value,
            "subject": _subject(signer.certificate),
            "certificate_pem": signer.certificate.public_bytes(serialization.Encoding.PEM).decode(),
        },
    }
    data = manifest_bytes(manifest)
    signature = signer.private_key.sign(data, _PSS, hashes.SHA256())
    manifest_path, signature_path = manifest_paths(model_path)
    manifest_path.write_bytes(data)
    signature_path.write_text(base64.b64encode(signature).decode() + "\n")
    return manifest_path


# -- verification ---------------------------------------------------------------------------------


@dataclass
class Verification:
    """The outcome of ``verify_model``: ``problems`` empty means verified."""

    model_path: Path
    manifest: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked_signer: str | None = None
    """The server name the certificate was required to carry, under a given root CA."""

    @property
    def ok(self) -> bool:
        """Nothing differs. For a simulation signature that is integrity only: see
        ``verified_signer`` for who signed."""
        return not self.problems

    @property
    def verified_signer(self) -> str | None:
        """The participant proven to have signed (root CA and name both checked), else None."""
        return self.checked_signer if self.ok and not self.simulation else None

    @property
    def simulation(self) -> bool:
        return (self.manifest.get("signer") or {}).get("kind") == SignerKind.SIMULATION.value


def _read_inputs(model_path: Path) -> tuple[bytes, bytes]:
    manifest_path, signature_path = manifest_paths(model_path)
    for path, what in ((model_path, "model file"), (manifest_path, "manifest")):
        if not path.is_file():
            raise ManifestError(
                f"{path}: {what} not found; give the model file that was saved with its "
                f"manifest ({manifest_path.name} and {signature_path.name} beside it)"
            )
    if not signature_path.is_file():
        raise ManifestError(
            f"{signature_path}: signature not found; the manifest {manifest_path.name} is not "
            "signed, so nothing about the model can be verified"
        )
    try:
        signature = base64.b64decode(signature_path.read_text().strip(), validate=True)
    except ValueError:
        raise ManifestError(f"{signature_path}: not a base64 signature") from None
    return manifest_path.read_bytes(), signature


def trust_anchor_from_kit(kit: Path | str) -> tuple[Path, str]:
    """(root CA file, server name) from any FLARE startup kit of the federation.

    A site kit names its server in ``startup/fed_client.json`` (``servers[0].identity``), an
    admin kit in ``startup/fed_admin.json`` (``admin.server_identity``), the server's own kit in
    the common name of ``startup/server.crt``. Use a kit you hold yourself (and have checked with
    ``fedseg site check --kit KIT --root-ca-sha256 ...``), not one that came with the model.

    Raises:
        ManifestError: the folder is not a startup kit, or names no server.
    """
    startup = Path(kit) / "startup"
    root_ca = startup / ROOT_CA
    if not root_ca.is_file():
        raise ManifestError(
            f"{kit}: not a FLARE startup kit (no startup/{ROOT_CA}); pass the folder of a kit "
            "of this federation (a site's, an admin's or the server's)"
        )
    try:
        if (startup / CLIENT_CONFIG).is_file():
            config = json.loads((startup / CLIENT_CONFIG).read_text())
            name, where = config["servers"][0]["identity"], f"{CLIENT_CONFIG} servers[0].identity"
        elif (startup / ADMIN_CONFIG).is_file():
            config = json.loads((startup / ADMIN_CONFIG).read_text())
            name, where = (
                config["admin"]["server_identity"],
                f"{ADMIN_CONFIG} admin.server_identity",
            )
        elif (startup / SERVER_CERT).is_file():
            certificate = x509.load_pem_x509_certificate((startup / SERVER_CERT).read_bytes())
            name, where = _subject(certificate), f"{SERVER_CERT} common name"
        else:
            raise ManifestError(
                f"{kit}: startup/ holds none of {CLIENT_CONFIG}, {ADMIN_CONFIG} or {SERVER_CERT}, "
                "so it does not say which participant is the server; pass a whole kit"
            )
    except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
        raise ManifestError(
            f"{startup}: cannot read the server's name ({type(error).__name__}: {error}); "
            "reinstall the kit"
        ) from None
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{startup}: {where} is empty; reinstall the kit")
    return root_ca, name


def _check_chain(certificate: x509.Certificate, root_ca: Path, created: str | None) -> list[str]:
    try:
        root = x509.load_pem_x509_certificate(Path(root_ca).read_bytes())
    except (OSError, ValueError) as error:
        raise ManifestError(f"{root_ca}: cannot read the root CA certificate ({error})") from None
    problems = []
    try:
        certificate.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        problems.append(
            f"certificate: the signer '{_subject(certificate)}' was not issued by the root CA "
            f"'{_subject(root)}' ({root_ca}); the manifest was not signed by this federation's "
            "provisioned server"
        )
        return problems
    if created:
        try:
            signed_at = datetime.datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(
                tzinfo=datetime.UTC
            )
        except (TypeError, ValueError):
            return [f"manifest: created_utc {created!r} is not a UTC time (YYYY-MM-DDTHH:MM:SSZ)"]
        if not certificate.not_valid_before_utc <= signed_at <= certificate.not_valid_after_utc:
            problems.append(
                f"certificate: not valid at the signing time {created} (valid "
                f"{certificate.not_valid_before_utc:%Y-%m-%d} to "
                f"{certificate.not_valid_after_utc:%Y-%m-%d})"
            )
    return problems


def verify_model(
    model_path: Path,
    *,
    root_ca: Path | None = None,
    signer_name: str | None = None,
    spec: Mapping | None = None,
) -> Verification:
    """Check a model file against its signed manifest; every difference is a problem.

    Checks, in order: the signature over the manifest's bytes, with the embedded certificate's
    key; the sha256 of the model file; with ``root_ca``, that the certificate was issued by that
    root CA and was valid when the manifest says it was signed; with ``signer_name``, that the
    certificate names that participant; with ``spec`` (plain data), that it is the spec the
    model was trained with. A difference between the code that made the model and the fedseg
    code installed here is a note, not a problem.

    Fails closed: a manifest signed by a provisioned identity is a problem without ``root_ca``
    (its embedded certificate alone proves nothing: anyone can make one), and ``root_ca``
    without ``signer_name`` is one too (FLARE certifies sites and admins with the same root CA
    as the server, so only the name tells the server apart). ``trust_anchor_from_kit`` gives
    both. A simulation signature passes without them, for integrity only: ``verified_signer``
    stays None and a note says so.

    Args:
        root_ca: the federation's ``rootCA.pem``, from a startup kit the caller trusts.
        signer_name: the participant that must have signed, normally the server's name.

    Raises:
        ManifestError: a file is missing or unreadable (nothing could be checked).
    """
    model_path = Path(model_path)
    result = Verification(model_path=model_path)
    data, signature = _read_inputs(model_path)
    try:
        manifest = json.loads(data)
        certificate = x509.load_pem_x509_certificate(manifest["signer"]["certificate_pem"].encode())
    except (ValueError, KeyError, TypeError) as error:
        result.problems.append(
            f"manifest: not a fedseg model manifest with a signer certificate ({error}); it was "
            "changed or is not one"
        )
        return result
    result.manifest = manifest
    public_key = certificate.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        result.problems.append("signature: the signer certificate does not hold an RSA key")
    else:
        try:
            public_key.verify(signature, data, _PSS, hashes.SHA256())
        except InvalidSignature:
            result.problems.append(
                "signature: does not match the manifest's bytes under the signer's certificate; "
                "the manifest, its embedded certificate or the signature was changed after signing"
            )
    actual = file_sha256(model_path)
    if actual != manifest.get("model_sha256"):
        result.problems.append(
            f"weights: sha256 of {model_path.name} is {actual}, the manifest says "
            f"{manifest.get('model_sha256')}; the model file was changed after signing"
        )
    kind = (manifest.get("signer") or {}).get("kind")
    if kind not in {k.value for k in SignerKind}:
        result.problems.append(
            f"signer: kind {kind!r} is neither {SignerKind.PROVISIONED.value!r} nor "
            f"{SignerKind.SIMULATION.value!r}; the manifest was not written by fedseg"
        )
    if root_ca is not None:
        result.problems += _check_chain(certificate, root_ca, manifest.get("created_utc"))
    elif kind != SignerKind.SIMULATION.value:
        result.problems.append(
            f"signer: the manifest says a provisioned participant ('{_subject(certificate)}') "
            "signed it, but no root CA was given, and a certificate embedded in the manifest "
            "proves nothing on its own; pass --kit KIT (a startup kit of the federation) or "
            "--root-ca rootCA.pem --signer SERVER"
        )
    if signer_name is not None:
        result.checked_signer = signer_name
        if _subject(certificate) != signer_name:
            result.problems.append(
                f"certificate: the manifest was signed by '{_subject(certificate)}', not by "
                f"'{signer_name}'"
            )
    elif root_ca is not None:
        result.problems.append(
            f"signer: signed by '{_subject(certificate)}', but without the server's name the "
            "check cannot tell the server from a site or an admin (FLARE certifies all of them "
            "with the same root CA); pass --kit KIT, or --signer SERVER with --root-ca"
        )
    if spec is not None and spec_sha256(spec) != manifest.get("spec_sha256"):
        result.problems.append(
            f"spec: sha256 {spec_sha256(spec)} differs from the manifest's "
            f"{manifest.get('spec_sha256')}; the model was trained with another spec"
        )
    if result.simulation:
        result.notes.append(
            "simulation signature: a throwaway key made by the simulator; it shows the files are "
            "unchanged since signing, not which server signed them"
        )
    try:
        if manifest.get("code_sha256") != code_sha256():
            result.notes.append(
                "the fedseg code installed here differs from the code that made the model "
                f"(made with fedseg {manifest.get('fedseg_version')})"
            )
    except ManifestError:
        pass
    return result
