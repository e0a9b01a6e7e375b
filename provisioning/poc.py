"""``fedseg poc``: a real FLARE federation on this machine, from provisioned startup kits.

Not the simulator: the server and every site are separate FLARE processes started by their kits'
own ``startup/sub_start.sh`` (the same script a hospital runs), talking mutual TLS on loopback.
``start_poc`` provisions a project (the shipped template with N sites and a free port), points
each site at its data, starts everything and waits until every site is connected;
``stop_poc`` shuts the system down through FLARE's admin API and then makes sure no process of
the POC is left.

State lives in ``<workspace>/poc.json`` (kits folder, process ids), so ``stop`` works from
another shell.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import yaml

from jobs.kit_layout import SITE_CONFIG_FILE
from provisioning.provision import Federation, load_federation, provision, template_text

__all__ = [
    "PocError",
    "PocState",
    "connected_sites",
    "poc_processes",
    "start_participant",
    "start_poc",
    "stop_participant",
    "stop_poc",
    "wait_until_connected",
]

STATE_FILE = "poc.json"


class PocError(RuntimeError):
    """The POC could not be started or stopped; the message says what to do."""


@dataclass
class PocState:
    """What ``stop`` needs: where the kits are and the daemon process of each participant."""

    kits_dir: str
    pids: dict[str, int]
    connected_after_s: float | None = None

    def save(self, workspace: Path) -> None:
        (workspace / STATE_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, workspace: Path) -> PocState:
        path = workspace / STATE_FILE
        if not path.is_file():
            raise PocError(
                f"{workspace}: no POC state ({STATE_FILE}); start one with `fedseg poc start`"
            )
        return cls(**json.loads(path.read_text()))

    @property
    def federation(self) -> Federation:
        return load_federation(Path(self.kits_dir))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def poc_project(sites: int, port: int) -> dict:
    """The shipped project template with ``sites`` sites (site-1..site-N) on ``port``."""
    project = yaml.safe_load(template_text())
    project["name"] = "fedseg_poc"
    participants = [p for p in project["participants"] if p["type"] != "client"]
    server = next(p for p in participants if p["type"] == "server")
    server["name"], server["fed_learn_port"] = "localhost", port
    orgs = ["hospital_a", "hospital_b"]
    clients = [
        {
            "name": f"site-{i}",
            "type": "client",
            "org": orgs[(i - 1) % 2] if i <= 2 else f"hospital_{i}",
        }
        for i in range(1, sites + 1)
    ]
    project["participants"] = [server, *clients, *(p for p in participants if p["type"] == "admin")]
    return project


def _point_sites_at_data(federation: Federation, data_dir: Path, workspace: Path) -> None:
    """Each kit's fedseg config reads ``<data_dir>/<site>`` and caches under the workspace."""
    for site, kit in federation.sites.items():
        path = kit / "local" / SITE_CONFIG_FILE
        config = yaml.safe_load(path.read_text())
        config["data_dir"] = str((data_dir / site).resolve())
        config["cache_dir"] = str((workspace / "cache" / site).resolve())
        path.write_text(yaml.safe_dump(config, sort_keys=False))


def _environment() -> dict[str, str]:
    """The kits' scripts call ``python3``: make it this interpreter (the one with fedseg)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("NVFL_WORKSPACE", None)
    return env


def start_participant(kit: Path) -> int:
    """Start one kit's FLARE daemon (``startup/sub_start.sh``) in its own process group."""
    for leftover in ("shutdown.fl", "daemon_pid.fl", "pid.fl"):
        (kit / leftover).unlink(missing_ok=True)
    console = (kit / "poc_console.txt").open("ab")
    process = subprocess.Popen(
        ["bash", str(kit / "startup" / "sub_start.sh")],
        cwd=kit,
        env=_environment(),
        stdin=subprocess.DEVNULL,
        stdout=console,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own group: stop can end it and its children together
    )
    console.close()
    return process.pid


def poc_processes(kits_dir: Path) -> list[psutil.Process]:
    """Every live process started from this POC's kits (daemons, FLARE parents and job
    processes), found by the kit path on their command line or as working directory."""
    marker = str(Path(kits_dir).resolve())
    found = []
    for process in psutil.process_iter(["cmdline", "cwd"]):
        try:
            cmdline = " ".join(process.info["cmdline"] or [])
            cwd = process.info["cwd"] or ""
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if process.pid != os.getpid() and (marker in cmdline or cwd.startswith(marker)):
            found.append(process)
    return found


def stop_participant(kit: Path, pid: int, *, grace_s: float = 15.0) -> None:
    """Stop one kit's processes: ask its daemon to stop, then end its process group."""
    _stop_daemons({kit: pid}, grace_s)


def _stop_daemons(daemons: dict[Path, int], grace_s: float) -> list[Path]:
    """Touch each kit's ``shutdown.fl`` (the daemon's own stop signal), wait, then end what is
    left of each kit; return the kits whose processes had to be killed.

    Processes are found by their kit path (command line or working directory), never by a
    remembered pid alone: the pid of an exited daemon may by now belong to another process.
    """
    for kit in daemons:
        (kit / "shutdown.fl").touch()
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(poc_processes(kit) for kit in daemons):
        time.sleep(0.5)
    forced = [kit for kit in daemons if poc_processes(kit)]
    for kit in forced:
        for process in poc_processes(kit):
            with contextlib.suppress(psutil.NoSuchProcess):
                process.terminate()
        time.sleep(1.0)
        for process in poc_processes(kit):
            _kill(process)
    return forced


def _kill(process: psutil.Process) -> None:
    try:
        process.kill()
        process.wait(5)
    except (psutil.NoSuchProcess, psutil.TimeoutExpired):
        pass


def connected_sites(federation: Federation, *, timeout_s: float = 10.0) -> list[str]:
    """Sites the server currently lists as connected (asked as the project admin)."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    admin = federation.admin_with_role("project_admin")
    with contextlib.redirect_stdout(io.StringIO()):  # FLARE prints "Connecting to FLARE ..."
        session = new_secure_session(admin, str(federation.admins[admin][1]), timeout=timeout_s)
    try:
        return sorted(client.name for client in session.get_system_info().client_info)
    finally:
        session.close()


def wait_until_connected(
    federation: Federation, sites: list[str], *, timeout_s: float = 120.0
) -> float:
    """Block until every site in ``sites`` is connected; return the seconds it took."""
    started = time.monotonic()
    last_error = "the server did not answer"
    while time.monotonic() - started < timeout_s:
        try:
            if set(sites) <= set(connected_sites(federation)):
                return time.monotonic() - started
            last_error = "not every site has connected yet"
        except Exception as error:  # the server is still starting: try again
            last_error = f"{type(error).__name__}: {error}"
        time.sleep(1.0)
    raise PocError(
        f"POC not ready after {timeout_s:.0f} s ({last_error}); look at log.txt in each kit "
        f"under {federation.kits_dir}"
    )


def start_poc(
    workspace: Path | str,
    *,
    sites: int,
    data_dir: Path | str,
    port: int | None = None,
    timeout_s: float = 180.0,
) -> PocState:
    """Provision ``sites`` sites into ``workspace``, start server and sites, wait until connected.

    Args:
        data_dir: a folder with one sub-folder per site (``site-1``, ...), e.g. written by
            ``fedseg simulate data`` (``fedseg poc start`` writes one when given none).
        port: the server's port on loopback; None = a free one.
    """
    workspace = Path(workspace).resolve()
    if (workspace / STATE_FILE).is_file():
        state = PocState.load(workspace)
        if poc_processes(Path(state.kits_dir)):
            raise PocError(
                f"{workspace}: a POC is already running there; stop it with "
                f"`fedseg poc stop --workspace {workspace}`"
            )
    workspace.mkdir(parents=True, exist_ok=True)
    data_dir = Path(data_dir).resolve()
    missing = [f"site-{i}" for i in range(1, sites + 1) if not (data_dir / f"site-{i}").is_dir()]
    if missing:
        raise PocError(
            f"{data_dir}: no data folder for {', '.join(missing)}; generate it with "
            f"`fedseg simulate data --sites {sites} --out {data_dir}`"
        )
    project_file = workspace / "project.yml"
    project_file.write_text(
        yaml.safe_dump(poc_project(sites, port or _free_port()), sort_keys=False)
    )
    federation = provision(project_file, workspace / "kits")
    _point_sites_at_data(federation, data_dir, workspace)
    pids = {federation.server: start_participant(federation.server_kit)}
    state = PocState(kits_dir=str(federation.kits_dir), pids=pids)
    state.save(workspace)
    for site, kit in federation.sites.items():
        pids[site] = start_participant(kit)
        state.save(workspace)
    try:
        state.connected_after_s = wait_until_connected(
            federation, list(federation.sites), timeout_s=timeout_s
        )
    except PocError:
        stop_poc(workspace)
        raise
    state.save(workspace)
    return state


def stop_poc(workspace: Path | str, *, timeout_s: float = 30.0) -> list[str]:
    """Shut the POC down (FLARE admin shutdown, then each kit's daemon); return the names of
    participants whose processes had to be killed rather than stopping by themselves."""
    workspace = Path(workspace).resolve()
    state = PocState.load(workspace)
    federation = state.federation
    try:
        from nvflare.fuel.flare_api.flare_api import new_secure_session

        admin = federation.admin_with_role("project_admin")
        flare_log = logging.getLogger("nvflare")
        level = flare_log.level
        flare_log.setLevel(logging.CRITICAL)  # "server unreachable" is expected while it stops
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                session = new_secure_session(admin, str(federation.admins[admin][1]), timeout=5.0)
                try:
                    session.shutdown("all", wait=False)
                finally:
                    session.close()
        finally:
            flare_log.setLevel(level)
    except Exception:  # the server is already down or unreachable: stop the processes directly
        pass
    kits = {federation.server: federation.server_kit, **federation.sites}
    forced = _stop_daemons({kits[name]: pid for name, pid in state.pids.items()}, timeout_s)
    for process in poc_processes(Path(state.kits_dir)):
        _kill(process)
    (workspace / STATE_FILE).unlink(missing_ok=True)
    return [kit.name for kit in forced]
