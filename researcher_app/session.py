"""The researcher's side of a real federation: FLARE's Session API with an admin startup kit.

``submit`` turns a JobSpec into the same FLARE job the simulator runs
(``researcher_app.flare_job``) and submits it; ``list_jobs``, ``job_status``, ``abort`` and
``download`` wrap the Session API with answers a researcher can read: the round reached, the
sites connected, each site's epsilon and, when a site declined, the site's own reason. The
server's job folder holds ``fedseg/history.json`` (written by ``server_app.controller``), which
is where those answers come from.

Authentication, mutual TLS and authorization are FLARE's: the kit's certificate says who the
user is, and the server's ``authorization.json`` decides what that role may do.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from jobs import keys
from jobs.spec import JobSpec
from researcher_app.flare_job import build_job

__all__ = [
    "FederationError",
    "JobStatus",
    "SiteStatus",
    "abort",
    "admin_name",
    "download",
    "job_status",
    "list_jobs",
    "open_session",
    "submit",
]

HISTORY_IN_RESULT = Path("workspace") / "fedseg" / "history.json"
"""Where the server's job result keeps fedseg's run history (after ``download_job_result``)."""


class FederationError(RuntimeError):
    """The federation refused or could not do what was asked; the message says what to do."""


def admin_name(kit: Path) -> str:
    """The user name an admin kit was provisioned for (from ``startup/fed_admin.json``)."""
    config = Path(kit) / "startup" / "fed_admin.json"
    if not config.is_file():
        raise FederationError(
            f"{kit}: not an admin startup kit (no startup/fed_admin.json); pass the folder your "
            "project admin sent you, e.g. workspace/<project>/prod_00/you@example.org"
        )
    return json.loads(config.read_text())["admin"]["username"]


@contextlib.contextmanager
def open_session(kit: Path | str, *, timeout_s: float = 30.0) -> Iterator:
    """A FLARE secure session as the kit's user; closed on exit."""
    from nvflare.fuel.flare_api.api_spec import AuthenticationError, NoConnection
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    kit = Path(kit).resolve()
    user = admin_name(kit)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # FLARE prints "Connecting to FLARE ..."
            session = new_secure_session(user, str(kit), timeout=timeout_s)
    except (NoConnection, ConnectionError, TimeoutError) as error:
        raise FederationError(
            f"cannot reach the FLARE server from kit {kit} ({error}); check that the server "
            "is running and that startup/fed_admin.json names the right host and port"
        ) from None
    except AuthenticationError as error:
        raise FederationError(
            f"the server refused {user}'s login ({error}); the kit may come from another "
            "provisioning — ask the project admin for a current kit"
        ) from None
    try:
        yield session
    finally:
        session.close()


def _refused(action: str, user: str, error: Exception) -> FederationError:
    return FederationError(
        f"the server refused to {action} for {user}: {error}. Your role may not do this "
        "(see docs/researcher.md, roles); ask the project admin"
    )


def submit(spec: JobSpec, kit: Path | str, *, sites: list[str] | None = None) -> str:
    """Submit ``spec`` to the federation of ``kit``; return the job id.

    Args:
        sites: sites to train at; None = every site connected now.
    """
    from nvflare.fuel.flare_api.api_spec import AuthorizationError, InvalidJobDefinition

    user = admin_name(Path(kit))
    with open_session(kit) as session:
        connected = sorted(c.name for c in session.get_system_info().client_info)
        chosen = sorted(sites) if sites else connected
        absent = sorted(set(chosen) - set(connected))
        if absent:
            raise FederationError(
                f"site(s) {', '.join(absent)} are not connected (connected: "
                f"{', '.join(connected) or 'none'}); start them or leave them out with --sites"
            )
        if len(chosen) < spec.federation.min_clients:
            raise FederationError(
                f"{len(chosen)} site(s) connected but federation.min_clients is "
                f"{spec.federation.min_clients}; wait for more sites or lower min_clients"
            )
        job = build_job(spec, sites=chosen)
        with tempfile.TemporaryDirectory() as folder:
            job.export_job(folder)
            try:
                return session.submit_job(str(Path(folder) / spec.name))
            except AuthorizationError as error:
                raise _refused("accept the job", user, error) from None
            except InvalidJobDefinition as error:
                raise FederationError(f"the server rejected the job: {error}") from None
            except Exception as error:  # FLARE reports other refusals as plain errors
                raise FederationError(f"the server did not accept the job: {error}") from None


def list_jobs(kit: Path | str) -> list[dict]:
    """The jobs this user may see: id, name, status, submit time, duration."""
    with open_session(kit) as session:
        return session.list_jobs(detailed=False) or []


def abort(kit: Path | str, job_id: str) -> None:
    from nvflare.fuel.flare_api.api_spec import AuthorizationError, JobNotFound, JobNotRunning

    user = admin_name(Path(kit))
    with open_session(kit) as session:
        try:
            session.abort_job(job_id)
        except JobNotFound:
            raise FederationError(f"no job {job_id} (see `fedseg job list`)") from None
        except JobNotRunning:
            raise FederationError(f"job {job_id} is not running; nothing to abort") from None
        except AuthorizationError as error:
            raise _refused(f"abort job {job_id}", user, error) from None


@dataclass
class SiteStatus:
    """One site's latest answer in a job (no patient data: counts, metrics, epsilon, reason)."""

    site: str
    last_round: int | None = None
    val_dice: float | None = None
    epsilon: float | None = None
    budget_left: float | None = None
    refused: str | None = None
    missing_rounds: list[int] = field(default_factory=list)


@dataclass
class JobStatus:
    job_id: str
    name: str
    status: str
    submitted: str | None
    duration: str | None
    rounds_done: int
    rounds_planned: int | None
    sites_connected: list[str]
    sites: list[SiteStatus]
    errors: list[str] = field(default_factory=list)


def _site_statuses(history: dict) -> list[SiteStatus]:
    statuses: dict[str, SiteStatus] = {}
    for record in sorted(history.get("rounds", []), key=lambda r: (r["round"], r["site"])):
        status = statuses.setdefault(record["site"], SiteStatus(site=record["site"]))
        if record.get("missing"):
            status.missing_rounds.append(record["round"])
            continue
        status.last_round = record["round"]
        for name in ("val_dice", "epsilon", "budget_left", "refused"):
            if record.get(name) is not None:
                setattr(status, name, record[name])
    for site in history.get("sites", []):
        statuses.setdefault(site, SiteStatus(site=site))
    return [statuses[name] for name in sorted(statuses)]


def _history_of(session, job_id: str, running: bool) -> dict | None:
    """The controller's history: asked from the running job, or read from its stored result."""
    if running:
        try:
            return session.do_app_command(job_id, keys.STATUS_COMMAND, {})
        except Exception:  # an older job or a controller not yet started: no live history
            return None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            result = Path(session.download_job_result(job_id))
    except Exception:
        return None
    try:
        path = result / HISTORY_IN_RESULT
        return json.loads(path.read_text()) if path.is_file() else None
    finally:  # the copy in the kit's transfer/ folder is not the researcher's result
        shutil.rmtree(result, ignore_errors=True)


def _site_errors(session, job_id: str) -> list[str]:
    """FLARE's per-site error summary, one line each (no stack traces)."""
    try:
        errors = session.show_errors(job_id, "client") or {}
    except Exception:
        return []
    lines = []
    for site, entries in sorted(errors.items()):
        if isinstance(entries, dict):
            for kind, count in sorted(entries.items()):
                lines.append(f"{site}: {kind} ({count})")
        elif entries:
            lines.append(f"{site}: {entries}")
    return lines


def job_status(kit: Path | str, job_id: str) -> JobStatus:
    """Where a job stands: FLARE's status plus fedseg's per-site rounds, epsilon and refusals."""
    from nvflare.fuel.flare_api.api_spec import JobNotFound

    with open_session(kit) as session:
        try:
            meta = session.get_job_meta(job_id)
        except JobNotFound:
            raise FederationError(f"no job {job_id} (see `fedseg job list`)") from None
        if not meta:
            raise FederationError(f"no job {job_id} (see `fedseg job list`)")
        status = str(meta.get("status", "?"))
        connected = sorted(c.name for c in session.get_system_info().client_info)
        history = _history_of(session, job_id, running=status == "RUNNING")
        sites = _site_statuses(history) if history else []
        rounds_done = int((history or {}).get("rounds_completed") or 0)
        planned = (history or {}).get("rounds_planned")
        # FLARE's per-site deployment answers, e.g. "site-1: NVFLARE_ERROR: BYOC not permitted".
        errors = [
            str(line)
            for line in meta.get("job_deploy_detail") or []
            if not str(line).endswith(": OK")
        ]
        if "EXCEPTION" in status:
            errors += _site_errors(session, job_id)
        return JobStatus(
            job_id=job_id,
            name=str(meta.get("name", "?")),
            status=status,
            submitted=meta.get("submit_time_iso"),
            duration=meta.get("duration"),
            rounds_done=rounds_done,
            rounds_planned=planned,
            sites_connected=connected,
            sites=sites,
            errors=errors,
        )


def download(kit: Path | str, job_id: str, out_dir: Path | str) -> Path:
    """Fetch a finished job's server result and lay it out like a simulation's results folder:
    ``history.json`` and ``models/`` (global model per round, best, final + manifest).

    Returns the results folder. The FLARE download itself is kept under ``flare_result/``.
    """
    from nvflare.fuel.flare_api.api_spec import AuthorizationError, JobNotFound

    user = admin_name(Path(kit))
    out_dir = Path(out_dir)
    with open_session(kit) as session:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                fetched = Path(session.download_job_result(job_id))
        except JobNotFound:
            raise FederationError(f"no job {job_id} (see `fedseg job list`)") from None
        except AuthorizationError as error:
            raise _refused(f"download job {job_id}", user, error) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "flare_result"
    if raw.exists():
        shutil.rmtree(raw)
    shutil.move(str(fetched), raw)
    fedseg = raw / "workspace" / "fedseg"
    if not (fedseg / "history.json").is_file():
        raise FederationError(
            f"job {job_id} left no fedseg history (it may have failed before its first round); "
            f"see `fedseg job status {job_id}` and {raw / 'workspace' / 'log.txt'}"
        )
    shutil.copy2(fedseg / "history.json", out_dir / "history.json")
    models = out_dir / "models"
    models.mkdir(exist_ok=True)
    for path in sorted(fedseg.iterdir()):
        if path.name != "history.json" and path.suffix in (".pt", ".json", ".sig"):
            shutil.copy2(path, models / path.name)
    return out_dir
