"""``fedseg site check --kit``: is this hospital's startup kit ready to join the federation?

Each check gives a pass, warning or failure with what to fix. Checks: the kit has every file
FLARE needs; its root CA is the project's (the sha256 fingerprint the project admin gave by
another channel); its startup folder still matches the provisioning signature; the site
certificate chains to the project's root CA and is within its validity; the server address
resolves and answers; the site config loads, its data folder is readable and ingests (a summary,
no patient data); the privacy policy loads and the epsilon ledger verifies, with the budget left.

The signature is verified with the ``rootCA.pem`` inside the signed folder, so on its own it
only proves the folder is consistent: whoever can write the kit can swap the CA and re-sign.
Only the fingerprint, which does not travel with the kit, anchors it.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding

from site_app.site_config import SITE_CONFIG_FILE, SiteConfigError, load_site_config

__all__ = [
    "CheckResult",
    "Outcome",
    "certificate_sha256",
    "check_kit",
    "format_sha256",
    "parse_sha256",
]

EXPIRY_WARNING_DAYS = 30
ROOT_CA_FILE = "rootCA.pem"
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_STARTUP_FILES = ("fed_client.json", "client.crt", "client.key", ROOT_CA_FILE, "sub_start.sh")


class Outcome(StrEnum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class CheckResult:
    item: str
    outcome: Outcome
    detail: str
    fix: str = ""


def _completeness(kit: Path) -> CheckResult:
    missing = [
        f"startup/{name}" for name in _STARTUP_FILES if not (kit / "startup" / name).is_file()
    ]
    if not (kit / "local" / SITE_CONFIG_FILE).is_file():
        missing.append(f"local/{SITE_CONFIG_FILE}")
    if missing:
        return CheckResult(
            "kit complete",
            Outcome.FAIL,
            f"missing {', '.join(missing)}",
            "unpack the whole kit your project admin sent (fedseg provision output) into this "
            "folder; do not copy single files between kits",
        )
    return CheckResult("kit complete", Outcome.PASS, f"all files FLARE and fedseg need in {kit}")


def certificate_sha256(pem_path: Path | str) -> str:
    """sha256 (lower-case hex) of the DER encoding of the certificate in ``pem_path``; the same
    value as ``openssl x509 -in FILE -outform DER | sha256sum``.

    Raises:
        OSError: the file cannot be read.
        ValueError: it holds no PEM certificate.
    """
    certificate = x509.load_pem_x509_certificate(Path(pem_path).read_bytes())
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def parse_sha256(text: str) -> str:
    """A sha256 fingerprint as typed or read out: hex, with or without colons or spaces, any
    case. Returns 64 lower-case hex digits.

    Raises:
        ValueError: not 64 hex digits once colons and spaces are removed.
    """
    digits = re.sub(r"[\s:]", "", text).lower()
    if not _SHA256_HEX.match(digits):
        raise ValueError(
            f"expected a sha256 fingerprint (64 hex digits, colons allowed), got {text!r}; copy "
            "the root CA fingerprint `fedseg provision` printed for the project admin"
        )
    return digits


def format_sha256(digits: str) -> str:
    """``ab12…`` -> ``AB:12:…``, the form openssl prints and people read out."""
    return ":".join(digits[i : i + 2] for i in range(0, len(digits), 2)).upper()


def _root_ca(kit: Path, expected_sha256: str | None) -> CheckResult:
    path = kit / "startup" / ROOT_CA_FILE
    try:
        actual = certificate_sha256(path)
    except (OSError, ValueError) as error:
        return CheckResult(
            "root CA",
            Outcome.FAIL,
            f"cannot read startup/{ROOT_CA_FILE} ({error})",
            "reinstall the kit the project admin sent",
        )
    if expected_sha256 is None:
        return CheckResult(
            "root CA",
            Outcome.WARN,
            f"not anchored: startup/{ROOT_CA_FILE} (sha256 {format_sha256(actual)}) was not "
            "compared with the project's root CA, so a kit whose CA was replaced and startup/ "
            "re-signed would pass every other check",
            "ask the project admin for the root CA sha256 fingerprint that `fedseg provision` "
            "printed, by phone or another channel than the kit, and run again with "
            "--root-ca-sha256 FINGERPRINT",
        )
    if actual != expected_sha256:
        return CheckResult(
            "root CA",
            Outcome.FAIL,
            f"startup/{ROOT_CA_FILE} has sha256 {format_sha256(actual)}, the project's root CA "
            f"has {format_sha256(expected_sha256)}: this kit's CA was replaced (or the kit is "
            "from another project), so its signature proves nothing",
            "do not start this kit; get the original from the project admin and check the "
            "fingerprint with them by phone",
        )
    return CheckResult(
        "root CA",
        Outcome.PASS,
        f"startup/{ROOT_CA_FILE} is the project's root CA (sha256 {format_sha256(actual)})",
    )


def _signature(kit: Path) -> CheckResult:
    from nvflare.lighter.constants import ProvFileName
    from nvflare.lighter.utils import verify_folder_signature

    startup = kit / "startup"
    if not (startup / ProvFileName.SIGNATURE_JSON).is_file():
        return CheckResult(
            "kit signature",
            Outcome.FAIL,
            f"startup/{ProvFileName.SIGNATURE_JSON} is missing: startup/ is not signed, so a "
            "change to it (server address, certificates) cannot be detected",
            "reinstall the kit the project admin sent (`fedseg provision` signs startup/); "
            "never delete signature.json",
        )
    if not verify_folder_signature(
        str(startup),
        str(startup / ROOT_CA_FILE),
        single_signer=True,
        signature_file=ProvFileName.SIGNATURE_JSON,
    ):
        return CheckResult(
            "kit signature",
            Outcome.FAIL,
            "startup/ was changed after provisioning (a file differs from its signature)",
            "reinstall the kit from the project admin's original; FLARE will refuse to start it",
        )
    return CheckResult(
        "kit signature",
        Outcome.PASS,
        f"startup/ matches its provisioning signature under startup/{ROOT_CA_FILE}",
    )


def _certificate(kit: Path, now: datetime) -> CheckResult:
    try:
        cert = x509.load_pem_x509_certificate((kit / "startup" / "client.crt").read_bytes())
        root = x509.load_pem_x509_certificate((kit / "startup" / ROOT_CA_FILE).read_bytes())
    except (OSError, ValueError) as error:
        return CheckResult(
            "certificate", Outcome.FAIL, f"cannot read the certificates ({error})", "reinstall"
        )
    try:
        root.public_key().verify(
            cert.signature,
            cert.tbs_certificate_bytes,
            padding.PKCS1v15(),
            cert.signature_hash_algorithm,
        )
    except (InvalidSignature, TypeError, ValueError):
        return CheckResult(
            "certificate",
            Outcome.FAIL,
            "startup/client.crt was not issued by this kit's rootCA.pem",
            "the kit mixes files of two provisionings; reinstall the whole kit",
        )
    if now < cert.not_valid_before_utc:
        return CheckResult(
            "certificate",
            Outcome.FAIL,
            f"not valid before {cert.not_valid_before_utc:%Y-%m-%d}",
            "check this machine's clock",
        )
    days_left = (cert.not_valid_after_utc - now).days
    if days_left < 0:
        return CheckResult(
            "certificate",
            Outcome.FAIL,
            f"expired on {cert.not_valid_after_utc:%Y-%m-%d}",
            "ask the project admin to re-provision and send a new kit",
        )
    subject = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    name = subject[0].value if subject else "?"
    if days_left < EXPIRY_WARNING_DAYS:
        return CheckResult(
            "certificate",
            Outcome.WARN,
            f"site {name}: expires in {days_left} day(s)",
            "ask the project admin for a renewed kit before it expires",
        )
    return CheckResult(
        "certificate",
        Outcome.PASS,
        f"site {name}, issued by the project root CA, valid for {days_left} more day(s)",
    )


def _server_address(kit: Path, timeout_s: float) -> CheckResult:
    try:
        config = json.loads((kit / "startup" / "fed_client.json").read_text())
        target = config["servers"][0]["service"]["target"]
        host, port = target.rsplit(":", 1)
        port_number = int(port)
    except (OSError, ValueError, KeyError, IndexError) as error:
        return CheckResult(
            "server address", Outcome.FAIL, f"fed_client.json unreadable ({error})", "reinstall"
        )
    try:
        address = socket.getaddrinfo(host, port_number, type=socket.SOCK_STREAM)[0][4]
    except socket.gaierror as error:
        return CheckResult(
            "server address",
            Outcome.FAIL,
            f"{host} does not resolve ({error})",
            f"ask IT to make {host} resolvable from this machine (DNS or /etc/hosts)",
        )
    try:
        with socket.create_connection((host, port_number), timeout=timeout_s):
            pass
    except OSError as error:
        return CheckResult(
            "server address",
            Outcome.FAIL,
            f"{host}:{port_number} ({address[0]}) resolves but does not answer ({error})",
            f"check that the server runs and the firewall lets this machine reach TCP "
            f"{port_number}",
        )
    return CheckResult("server address", Outcome.PASS, f"{host}:{port_number} answers")


def _data_and_policy(kit: Path) -> list[CheckResult]:
    try:
        config = load_site_config(kit / "local" / SITE_CONFIG_FILE)
    except SiteConfigError as error:
        return [CheckResult("site config", Outcome.FAIL, str(error), "fix the named field")]
    results = [_data(config.data_dir, config.cache_dir)]
    policy = config.policy
    rules = [f"DP {'required' if policy.dp_required else 'optional'}"]
    if policy.max_epsilon_per_job is not None:
        rules.append(f"max epsilon per job {policy.max_epsilon_per_job:g}")
    if policy.total_epsilon_budget is not None:
        rules.append(f"total budget {policy.total_epsilon_budget:g}")
    rules.append(f"min noise multiplier {policy.min_noise_multiplier:g}")
    results.append(CheckResult("privacy policy", Outcome.PASS, "; ".join(rules)))
    results.append(_ledger(kit, config))
    return results


def _data(data_dir: Path, cache_dir: Path | None) -> CheckResult:
    from site_app.ingestion import ingest_site

    if not data_dir.is_dir():
        return CheckResult(
            "data",
            Outcome.FAIL,
            f"{data_dir} is not a readable folder",
            f"set data_dir in local/{SITE_CONFIG_FILE} to the site's DICOM folder",
        )
    try:
        result = ingest_site(data_dir, cache_dir=cache_dir, progress=False)
    except (OSError, ValueError) as error:
        return CheckResult("data", Outcome.FAIL, str(error), "check the folder and permissions")
    patients = len(result.patients)
    detail = (
        f"{data_dir}: {patients} usable patient(s), {len(result.quarantine)} quarantined item(s)"
    )
    if patients < 2:
        return CheckResult(
            "data",
            Outcome.FAIL,
            detail,
            "a site needs at least 2 labelled patients; see `fedseg site check --data` for the "
            "quarantine reasons",
        )
    return CheckResult("data", Outcome.PASS, detail)


def _ledger(kit: Path, config) -> CheckResult:
    from site_app.ledger import EpsilonLedger

    path = config.ledger or kit / "fedseg" / "epsilon_ledger.jsonl"
    key = config.signing_key or kit / "fedseg" / "site_key.pem"
    budget = config.policy.total_epsilon_budget
    if not key.exists():
        left = "" if budget is None else f"; budget left {budget:g} of {budget:g}"
        return CheckResult(
            "epsilon ledger",
            Outcome.PASS,
            f"no DP job has run here yet (key created on first use){left}",
        )
    try:
        ledger = EpsilonLedger.open(path=path, key_path=key)
        problems = ledger.verify()
    except (OSError, ValueError) as error:
        return CheckResult("epsilon ledger", Outcome.FAIL, str(error), "see docs/site-admin.md")
    if problems:
        return CheckResult(
            "epsilon ledger",
            Outcome.FAIL,
            f"{path} failed verification ({problems[0]})",
            f"run `fedseg site ledger --ledger {path}` to see every problem; training stops "
            "until it is resolved",
        )
    spent = ledger.total_spent()
    if budget is None:
        return CheckResult("epsilon ledger", Outcome.PASS, f"verified; spent {spent:.3g} (no cap)")
    left = budget - spent
    outcome = Outcome.PASS if left > 0 else Outcome.FAIL
    return CheckResult(
        "epsilon ledger",
        outcome,
        f"verified; spent {spent:.3g} of {budget:g}, {max(left, 0):.3g} left",
        "" if left > 0 else "the budget is used up: the site will refuse DP jobs",
    )


def check_kit(
    kit: Path | str,
    *,
    root_ca_sha256: str | None = None,
    timeout_s: float = 3.0,
    now: datetime | None = None,
    on_result: Callable[[CheckResult], None] | None = None,
) -> list[CheckResult]:
    """Every preflight check of a site's startup kit, in order; stops after a broken kit.

    Args:
        root_ca_sha256: the project's root CA fingerprint (``parse_sha256`` forms), given to the
            site admin by another channel than the kit. Without it the root CA check warns: the
            signature then only shows that startup/ agrees with the kit's own CA.

    Raises:
        ValueError: ``root_ca_sha256`` is not a sha256 fingerprint.
    """
    kit = Path(kit)
    expected = None if root_ca_sha256 is None else parse_sha256(root_ca_sha256)
    results: list[CheckResult] = []

    def record(result: CheckResult) -> None:
        results.append(result)
        if on_result is not None:
            on_result(result)

    if not kit.is_dir():
        record(CheckResult("kit", Outcome.FAIL, f"{kit} is not a folder", "pass the kit's folder"))
        return results
    record(_completeness(kit))
    if results[-1].outcome is Outcome.FAIL:
        return results
    record(_root_ca(kit, expected))
    record(_signature(kit))
    record(_certificate(kit, now or datetime.now(UTC)))
    record(_server_address(kit, timeout_s))
    for result in _data_and_policy(kit):
        record(result)
    return results
