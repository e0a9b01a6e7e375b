"""``fedseg site check --kit``: is this hospital's startup kit ready to join the federation?

Each check gives a pass, warning or failure with what to fix. Checks: the kit has every file
FLARE needs; its startup folder still matches the provisioning signature; the site certificate
chains to the project's root CA and is within its validity; the server address resolves and
answers; the site config loads, its data folder is readable and ingests (a summary, no patient
data); the privacy policy loads and the epsilon ledger verifies, with the budget left.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import padding

from site_app.site_config import SITE_CONFIG_FILE, SiteConfigError, load_site_config

__all__ = ["CheckResult", "Outcome", "check_kit"]

EXPIRY_WARNING_DAYS = 30
_STARTUP_FILES = ("fed_client.json", "client.crt", "client.key", "rootCA.pem", "sub_start.sh")


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


def _signature(kit: Path) -> CheckResult:
    from nvflare.lighter.constants import ProvFileName
    from nvflare.lighter.utils import verify_folder_signature

    startup = kit / "startup"
    if not (startup / ProvFileName.SIGNATURE_JSON).is_file():
        return CheckResult(
            "kit signature",
            Outcome.WARN,
            "startup/ is not signed, so changes to it cannot be detected",
            "ask the project admin for a kit made by `fedseg provision` (it signs startup/)",
        )
    if not verify_folder_signature(
        str(startup),
        str(startup / "rootCA.pem"),
        single_signer=True,
        signature_file=ProvFileName.SIGNATURE_JSON,
    ):
        return CheckResult(
            "kit signature",
            Outcome.FAIL,
            "startup/ was changed after provisioning (a file differs from its signature)",
            "reinstall the kit from the project admin's original; FLARE will refuse to start it",
        )
    return CheckResult("kit signature", Outcome.PASS, "startup/ matches the provisioning signature")


def _certificate(kit: Path, now: datetime) -> CheckResult:
    try:
        cert = x509.load_pem_x509_certificate((kit / "startup" / "client.crt").read_bytes())
        root = x509.load_pem_x509_certificate((kit / "startup" / "rootCA.pem").read_bytes())
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
    timeout_s: float = 3.0,
    now: datetime | None = None,
    on_result: Callable[[CheckResult], None] | None = None,
) -> list[CheckResult]:
    """Every preflight check of a site's startup kit, in order; stops after a broken kit."""
    kit = Path(kit)
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
    record(_signature(kit))
    record(_certificate(kit, now or datetime.now(UTC)))
    record(_server_address(kit, timeout_s))
    for result in _data_and_policy(kit):
        record(result)
    return results
