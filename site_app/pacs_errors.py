"""How a PACS import fails: its one error type, and transport and disk failures in words.

Every step of ``fedseg site import`` (and of storing SEGs back, ``site_app.seg_writer``) raises
`PacsImportError`, whose message names the server and the fix. The translators here never quote
a request URL or the server's answer (both can carry UIDs); `transport_quiet` keeps the HTTP and
DICOM libraries' own log records and warnings, which quote them, out of the logs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import requests

from site_app.quiet_libraries import libraries_silenced

if TYPE_CHECKING:
    from site_app.dicomweb_source import DicomwebSource

__all__ = [
    "PacsImportError",
    "disk_errors",
    "http_errors",
    "transport_quiet",
]


_TRANSPORT_LOGGERS = ("dicomweb_client", "urllib3", "retrying", "pydicom")


class PacsImportError(Exception):
    """The import cannot go on; the message names what failed and what to do (no patient data)."""


@contextmanager
def http_errors(source: DicomwebSource, doing: str, *, searching: bool = False) -> Iterator:
    """Turn transport failures into a `PacsImportError` naming the server and the fix. Messages
    never quote the request URL or the server's answer: both can carry UIDs."""
    root = source.root
    try:
        yield
    except requests.exceptions.SSLError:
        raise PacsImportError(
            f"TLS failed with {root} while {doing}: its certificate is not trusted (or not valid "
            "for this host name); pass the PEM file of the CA that signed it with --ca-bundle"
        ) from None
    except requests.exceptions.Timeout:
        raise PacsImportError(
            f"{root} did not answer within {source.timeout_s:g} s while {doing}; check the "
            "network and the server's load, or allow more time with --timeout"
        ) from None
    except requests.exceptions.ConnectionError:
        raise PacsImportError(
            f"cannot reach the DICOMweb server at {root} while {doing} (connection refused, "
            "host unknown or connection dropped); check the URL's host and port, that the PACS "
            "is running, and that this machine may connect to it"
        ) from None
    except requests.exceptions.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        raise PacsImportError(_http_status_message(source, status, doing, searching)) from None
    except requests.exceptions.JSONDecodeError:
        raise PacsImportError(
            f"{root} answered while {doing}, but not with DICOM JSON: it is not a DICOMweb "
            "(QIDO-RS) root; check the URL's path (for Orthanc: http://HOST:8042/dicom-web)"
        ) from None
    except requests.exceptions.RequestException as exc:
        raise PacsImportError(
            f"the request to {root} failed while {doing} ({type(exc).__name__}); check the URL"
        ) from None
    except PacsImportError:
        raise
    except Exception as exc:  # retrying.RetryError, pydicom parse errors in multipart answers
        raise PacsImportError(
            f"{root} kept failing while {doing} ({type(exc).__name__}); run the import again "
            "later (it resumes), and check the server's log if it persists"
        ) from None


def _http_status_message(
    source: DicomwebSource, status: int | None, doing: str, searching: bool
) -> str:
    root = source.root
    if status == 401:
        if source.username is None:
            return (
                f"{root} requires a login (HTTP 401) while {doing}; pass --username USER and "
                "--password-env VAR with the password in environment variable VAR"
            )
        return (
            f"{root} refused the login (HTTP 401) while {doing}; check --username and the "
            f"password in the environment variable {source.password_env}"
        )
    if status == 403:
        return (
            f"{root} denied access (HTTP 403) while {doing}; ask the PACS administrator to let "
            "this user search and retrieve studies over DICOMweb"
        )
    if status == 404 and searching:
        return (
            f"{root} has no DICOMweb service (HTTP 404 for {urlsplit(root).path or '/'}/studies); "
            "check the URL's path (for Orthanc: http://HOST:8042/dicom-web) and that the server's "
            "DICOMweb plugin is installed and enabled (Debian: orthanc-dicomweb)"
        )
    if status == 404:
        return (
            f"{root} no longer has an item its own search listed (HTTP 404) while {doing}; it "
            "was probably deleted meanwhile: run the import again (it resumes)"
        )
    return (
        f"{root} answered HTTP {status} while {doing}; check the server's log, then run the "
        "import again (it resumes)"
    )


@contextmanager
def disk_errors(out_dir: Path) -> Iterator[None]:
    """Turn a failure to read or write the data folder (or the journal beside it) into a
    `PacsImportError` that says what to check."""
    try:
        yield
    except OSError as exc:
        raise PacsImportError(
            f"cannot read or write {out_dir} or its journal ({exc.strerror or type(exc).__name__});"
            " check free disk space and that this user may write there, then run the import "
            "again (it resumes)"
        ) from None


def transport_quiet():
    """Keep dicomweb-client, urllib3, retrying and pydicom log records and warnings out of logs:
    they quote request URLs (which hold UIDs), retried tracebacks and header values."""
    return libraries_silenced(*_TRANSPORT_LOGGERS)
