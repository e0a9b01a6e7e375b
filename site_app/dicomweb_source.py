"""Which PACS to import from, how to reach it, and what one run accepts from it.

Validated once, at the boundary: `DicomwebSource` (URL, login read from the environment, the
hospital's CA, timeouts; basic auth over plain http to another machine is refused unless
allowed), `StudySelection` (which studies) and `ImportLimits` (caps in counts and bytes, each
with the command-line flag that raises it). `http_session` is the requests session every
DICOMweb call goes through, trusting only the given CA.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from site_app.pacs_errors import PacsImportError
from site_app.pacs_plan import MAX_UID_LENGTH, is_dicom_uid

__all__ = [
    "DicomwebSource",
    "ImportLimits",
    "StudySelection",
    "http_session",
    "http_timeout",
    "limit_flags",
]


CONNECT_TIMEOUT_S = 10.0


MAX_SEARCH_PAGES = 1_000
"""Pages of one QIDO-RS search (a PACS answers ~100 results a page: 100,000 studies)."""


MAX_LISTED_INSTANCES = 500_000
"""Instances the selected studies may list in one run (~1,000 CT studies)."""


MAX_SEARCH_ANSWER_BYTES = 64 << 20
"""Bytes of one search answer (DICOM JSON), after HTTP content decoding."""


MAX_INSTANCE_BYTES = 1 << 30
"""Bytes of one instance as the server sends it."""


MAX_DECOMPRESSED_BYTES = 2 << 30
"""Decompressed size of one instance: its pixel data as declared (rows x columns x frames x
samples x bits), or its whole dataset once inflated (deflated transfer syntax)."""


MAX_RUN_BYTES = 500 << 30
"""Bytes received by the retrievals of one run."""


_MODALITY = re.compile(r"^[A-Z0-9_]{1,16}$")


_LOOPBACK_NAMES = frozenset({"localhost"})


def _size(count: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if count >= 1 << shift:
            return f"{count / (1 << shift):.3g} {unit}"
    return f"{count} bytes"


@dataclass(frozen=True, kw_only=True)
class DicomwebSource:
    """Where and how to reach the PACS's DICOMweb service.

    Args:
        url: the DICOMweb root, e.g. ``https://pacs.example.org/dicom-web`` (for Orthanc
            ``http://HOST:8042/dicom-web``). Must not carry a user or password.
        username: HTTP basic-auth user, or None for a server without login.
        password_env: name of the environment variable holding the password (required with
            ``username``); the password is read once, here, and never stored in this object.
        ca_bundle: PEM file of the CA certificate(s) that signed the server's TLS certificate
            (``https`` only); None trusts the system's CAs.
        timeout_s: seconds to wait for each answer (connecting waits at most 10 s).
        allow_insecure_http: accept ``username`` over plain ``http`` to another machine, where
            basic auth sends the password readable by anyone on the network path (for a link
            protected otherwise, e.g. a VPN). Loopback needs no permission.

    Raises:
        PacsImportError: any of the above is malformed or missing, or basic auth would cross
            the network over plain http without ``allow_insecure_http``.
    """

    url: str
    username: str | None = None
    password_env: str | None = None
    ca_bundle: Path | None = None
    timeout_s: float = 30.0
    allow_insecure_http: bool = False
    _password: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PacsImportError(
                f"--dicomweb {self.url!r}: expected an http:// or https:// URL with a host, e.g. "
                "https://pacs.example.org/dicom-web (for Orthanc: http://HOST:8042/dicom-web)"
            )
        if parts.username or parts.password:
            raise PacsImportError(
                "--dicomweb: the URL carries a user or password; remove it from the URL and pass "
                "--username USER --password-env VAR (the password in environment variable VAR)"
            )
        if parts.query or parts.fragment:
            raise PacsImportError(
                f"--dicomweb {self.url!r}: expected the DICOMweb root without '?' or '#' parts"
            )
        if (self.username is None) != (self.password_env is None):
            raise PacsImportError(
                "--username and --password-env go together: pass both for a server that needs a "
                "login (the password is read from the environment variable named by "
                "--password-env, never from the command line), or neither"
            )
        if self.password_env is not None:
            password = os.environ.get(self.password_env)
            if not password:
                raise PacsImportError(
                    f"--password-env {self.password_env}: that environment variable is not set "
                    f"or empty; set it to the PACS password (e.g. read {self.password_env} from "
                    "a file only this user can read) and run again"
                )
            object.__setattr__(self, "_password", password)
        if self.ca_bundle is not None:
            if parts.scheme != "https":
                raise PacsImportError(
                    "--ca-bundle applies to https:// URLs only; use the server's https URL"
                )
            if not Path(self.ca_bundle).is_file():
                raise PacsImportError(
                    f"--ca-bundle {self.ca_bundle}: file not found; pass the PEM file of the "
                    "CA that signed the PACS's certificate (ask the hospital's IT)"
                )
        if not self.timeout_s > 0:
            raise PacsImportError(f"--timeout: expected seconds > 0, got {self.timeout_s}")
        if self.sends_password_in_clear and not self.allow_insecure_http:
            raise PacsImportError(
                f"--username over {parts.scheme}://{parts.hostname}: refused, because HTTP basic "
                "auth over plain http sends the password in clear (only base64-encoded) across "
                "the network to the PACS; use the PACS's https:// URL (with --ca-bundle if the "
                "hospital's CA signed its certificate), or pass --allow-insecure-http if this "
                "network link is protected otherwise (e.g. a VPN)"
            )

    @property
    def root(self) -> str:
        """The URL without a trailing slash."""
        return self.url.rstrip("/")

    @property
    def sends_password_in_clear(self) -> bool:
        """True for basic auth over plain http to a host other than this machine."""
        parts = urlsplit(self.url)
        return self.username is not None and parts.scheme == "http" and not _is_loopback(parts)


def _is_loopback(parts) -> bool:
    host = parts.hostname or ""
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class StudySelection:
    """Which studies to import: all of them (the default), those listed, and/or those with a
    modality. Whole studies are imported (a CT study's SEG series comes along with it).

    Args:
        study_uids: StudyInstanceUIDs; empty means every study the server lists.
        modality: keep studies whose ModalitiesInStudy holds this code (``CT``, ``MR``...).
    """

    study_uids: tuple[str, ...] = ()
    modality: str | None = None

    def __post_init__(self) -> None:
        for position, uid in enumerate(self.study_uids, start=1):
            if not is_dicom_uid(uid):
                raise PacsImportError(
                    f"--study value number {position} is not a valid DICOM UID (digits and dots, "
                    f"at most {MAX_UID_LENGTH} characters, no leading zeros); copy the "
                    "StudyInstanceUID from the PACS again"
                )
        if self.modality is not None and not _MODALITY.match(self.modality):
            raise PacsImportError(
                f"--modality {self.modality!r}: expected an upper-case DICOM modality code such "
                "as CT or MR"
            )


_LIMIT_FLAGS = {
    "max_search_pages": ("--max-search-pages", 1),
    "max_listed_instances": ("--max-listed-instances", 1),
    "max_search_answer_bytes": ("--max-search-answer-mb", 1 << 20),
    "max_instance_bytes": ("--max-instance-mb", 1 << 20),
    "max_decompressed_bytes": ("--max-decompressed-mb", 1 << 20),
    "max_run_bytes": ("--max-run-gb", 1 << 30),
}
"""Each limit's command-line flag and the unit that flag counts in."""


def limit_flags() -> dict[str, tuple[str, int]]:
    """``ImportLimits`` field -> (command-line flag, bytes per unit of that flag; 1 for counts)."""
    return dict(_LIMIT_FLAGS)


@dataclass(frozen=True, kw_only=True)
class ImportLimits:
    """What one import run accepts from the server. Past any of them the run stops with an
    error naming the limit and its flag; every file written before stays (a rerun resumes).

    Args:
        max_search_pages: pages of one QIDO-RS search (a server answering new results forever).
        max_listed_instances: instances the selected studies may list in one run.
        max_search_answer_bytes: bytes of one search answer, after HTTP content decoding (a
            gzip bomb counts inflated).
        max_instance_bytes: bytes of one instance as received.
        max_decompressed_bytes: an instance's pixel data as declared by its header (rows x
            columns x frames x samples x bits allocated, what decoding it would allocate), or
            its dataset once inflated (deflated transfer syntax); checked before it is parsed
            or written.
        max_run_bytes: bytes the retrievals of one run receive.

    Raises:
        PacsImportError: a limit is not a whole number >= 1.
    """

    max_search_pages: int = MAX_SEARCH_PAGES
    max_listed_instances: int = MAX_LISTED_INSTANCES
    max_search_answer_bytes: int = MAX_SEARCH_ANSWER_BYTES
    max_instance_bytes: int = MAX_INSTANCE_BYTES
    max_decompressed_bytes: int = MAX_DECOMPRESSED_BYTES
    max_run_bytes: int = MAX_RUN_BYTES

    def __post_init__(self) -> None:
        for name, (flag, _) in _LIMIT_FLAGS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PacsImportError(f"{flag}: expected a whole number >= 1, got {value!r}")

    def describe(self, name: str) -> str:
        """``"4 MiB (--max-instance-mb)"``: the limit and the flag that raises it."""
        flag, unit = _LIMIT_FLAGS[name]
        value = getattr(self, name)
        return f"{value if unit == 1 else _size(value)} ({flag})"


def http_session(source: DicomwebSource) -> requests.Session:
    session = requests.Session()
    if source.username is not None:
        session.auth = (source.username, source._password or "")
    if source.ca_bundle is not None:
        session.mount("https://", _TrustingOnly(source.ca_bundle))
    return session


def http_timeout(source: DicomwebSource) -> tuple[float, float]:
    return (min(CONNECT_TIMEOUT_S, source.timeout_s), source.timeout_s)


class _TrustingOnly(HTTPAdapter):
    """Verifies https answers against ``ca_bundle`` only. (``session.verify`` is not enough:
    requests replaces it with ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` when those are set.)"""

    def __init__(self, ca_bundle: Path) -> None:
        super().__init__()
        self._ca_bundle = str(ca_bundle)

    def send(self, request, **kwargs):  # type: ignore[override]
        kwargs["verify"] = self._ca_bundle
        return super().send(request, **kwargs)
