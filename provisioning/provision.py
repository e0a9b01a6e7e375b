"""``fedseg provision``: FLARE's provisioner over a project file, and where each kit landed.

The project file is FLARE's own ``project.yml`` (see ``templates/project.yml``); fedseg adds two
builders to it (``provisioning.builders``). This module validates the file enough to give clear
errors, runs FLARE's provisioner in-process and describes the result.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from site_app.kit_check import certificate_sha256

__all__ = [
    "Federation",
    "ProvisioningError",
    "load_federation",
    "provision",
    "restrict_key_files",
    "template_text",
]

ROLES = ("project_admin", "org_admin", "lead", "member")
_FEDSEG_BUILDERS = ("provisioning.builders.FedsegSiteBuilder",)
_SIGNING_BUILDER = "provisioning.builders.StartupSigningBuilder"
_STATE_DIR = "state"
"""FLARE's folder beside the kits: ``cert.json`` holds the root CA key and every participant's
private key, so later runs issue certificates from the same root."""
_PRIVATE_DIR_MODE, _PRIVATE_FILE_MODE = 0o700, 0o600


class ProvisioningError(ValueError):
    """The project cannot be provisioned; the message names the field and the file."""


@dataclass(frozen=True)
class Federation:
    """The startup kits of one provisioning run (one ``prod_NN`` folder).

    Attributes:
        kits_dir: the ``prod_NN`` folder holding one kit per participant.
        server: the server's name (the host sites connect to) and its kit.
        sites: client name -> kit folder.
        admins: admin user name -> (role, kit folder).
        port: the server's FLARE port (sites and admin consoles both connect to it).
        root_ca_sha256: sha256 (hex) of the root CA certificate's DER, or None when the server
            kit has no ``startup/rootCA.pem``. Site admins check their kit against it
            (``fedseg site check --kit KIT --root-ca-sha256 HEX``), so it must reach them by
            another channel than the kit.
    """

    project: str
    kits_dir: Path
    server: str
    port: int
    sites: dict[str, Path] = field(default_factory=dict)
    admins: dict[str, tuple[str, Path]] = field(default_factory=dict)
    root_ca_sha256: str | None = None

    @property
    def server_kit(self) -> Path:
        return self.kits_dir / self.server

    def admin_with_role(self, role: str) -> str:
        for name, (admin_role, _) in sorted(self.admins.items()):
            if admin_role == role:
                return name
        raise ProvisioningError(f"{self.kits_dir}: no admin with role {role!r} was provisioned")


def template_text() -> str:
    """The project.yml template fedseg ships (FLARE's format plus fedseg's builders)."""
    return resources.files("provisioning").joinpath("templates/project.yml").read_text()


def _load_project(project_file: Path) -> dict:
    if not project_file.is_file():
        raise ProvisioningError(
            f"{project_file}: project file not found; write one with "
            f"`fedseg provision --write-template {project_file}` and edit it"
        )
    try:
        data = yaml.safe_load(project_file.read_text())
    except yaml.YAMLError as error:
        raise ProvisioningError(
            f"{project_file}: not valid YAML ({error}); fix the syntax"
        ) from None
    if not isinstance(data, dict):
        raise ProvisioningError(f"{project_file}: expected a mapping (api_version, name, ...)")
    return data


def _check_project(data: dict, source: Path) -> None:
    """Problems FLARE would report late or obscurely, named with the field and what to do."""
    participants = data.get("participants")
    if not isinstance(participants, list) or not participants:
        raise ProvisioningError(f"{source}: 'participants' must list the server, sites and admins")
    problems = []
    by_type: dict[str, list[dict]] = {}
    for index, entry in enumerate(participants):
        if not isinstance(entry, dict) or "name" not in entry or "type" not in entry:
            problems.append(f"participants[{index}]: needs at least name and type")
            continue
        by_type.setdefault(entry["type"], []).append(entry)
        if entry["type"] == "admin" and entry.get("role") not in ROLES:
            problems.append(
                f"participants[{index}] ({entry['name']}): role must be one of {list(ROLES)}, "
                f"got {entry.get('role')!r}"
            )
    if len(by_type.get("server", [])) != 1:
        problems.append("participants: exactly one entry with type: server is needed")
    if not by_type.get("client"):
        problems.append("participants: at least one site (type: client) is needed")
    paths = [b.get("path") for b in data.get("builders") or [] if isinstance(b, dict)]
    for builder in (*_FEDSEG_BUILDERS, _SIGNING_BUILDER):
        if builder not in paths:
            problems.append(
                f"builders: {builder} is missing (kits would lack fedseg's site config or "
                "signature); copy the builders section from the template"
            )
    if _SIGNING_BUILDER in paths and paths[-1] != _SIGNING_BUILDER:
        problems.append(f"builders: {_SIGNING_BUILDER} must be the last builder")
    if problems:
        raise ProvisioningError(
            f"{source}: {len(problems)} problem(s):\n  - "
            + "\n  - ".join(problems)
            + f"\n  fix them in {source}"
        )


class _CollectingLogger:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def info(self, msg: str) -> None:
        pass

    def debug(self, msg: str) -> None:
        pass

    def warning(self, msg: str) -> None:
        pass

    def error(self, msg: str) -> None:
        self.errors.append(msg)


def provision(project_file: Path | str, out_dir: Path | str) -> Federation:
    """Run FLARE's provisioner on ``project_file`` into ``out_dir``; return the kits made.

    Each run writes a new ``<out_dir>/<project name>/prod_NN`` folder; the root CA in
    ``<out_dir>/<project name>/state`` is reused, so kits of later runs trust each other.
    """
    from nvflare.lighter.prov_utils import prepare_builders, prepare_packager
    from nvflare.lighter.provision import prepare_project
    from nvflare.lighter.provisioner import Provisioner

    project_file = Path(project_file)
    data = _load_project(project_file)
    _check_project(data, project_file)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    logger = _CollectingLogger()
    try:
        project = prepare_project(data)
        builders = prepare_builders(data)
        packager = prepare_packager(data)
        # FLARE prints a traceback for a failing builder; its message is what we report.
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            ctx = Provisioner(str(out_dir), builders, packager).provision(project, logger=logger)
    except (ValueError, RuntimeError, TypeError, KeyError) as error:
        raise ProvisioningError(f"{project_file}: FLARE provisioning refused it: {error}") from None
    if logger.errors or ctx.get_result_location() is None:
        raise ProvisioningError(
            f"{project_file}: FLARE provisioning failed: " + "; ".join(logger.errors or ["?"])
        )
    kits_dir = Path(ctx.get_result_location())
    # The kits' own record of what was provisioned (read by `fedseg poc` and `job` commands).
    (kits_dir / "project.yml").write_text(project_file.read_text())
    restrict_key_files(kits_dir.parent)
    return load_federation(kits_dir)


def restrict_key_files(project_dir: Path | str) -> list[Path]:
    """Make private keys readable by their owner only; return the paths whose mode changed.

    FLARE writes ``state/cert.json`` (the root CA key and every participant's key) with the
    process's umask, typically 0644. Here ``state/`` and every folder holding a ``*.key`` of
    any ``prod_NN`` kit become 0700, and those files 0600 (``rootCA.key`` too, where a FLARE
    version writes one).
    """
    project_dir = Path(project_dir)
    files = [path for path in project_dir.rglob("*.key") if path.is_file()]
    state = project_dir / _STATE_DIR
    if state.is_dir():
        files += [path for path in state.rglob("*") if path.is_file()]
    folders = {path.parent for path in files}
    if state.is_dir():
        folders |= {state, *(path for path in state.rglob("*") if path.is_dir())}
    changed = []
    for path, mode in [
        *((folder, _PRIVATE_DIR_MODE) for folder in sorted(folders)),
        *((file, _PRIVATE_FILE_MODE) for file in sorted(set(files))),
    ]:
        if stat.S_IMODE(path.stat().st_mode) != mode:
            os.chmod(path, mode)
            changed.append(path)
    return changed


def load_federation(kits_dir: Path | str, *, project_file: Path | None = None) -> Federation:
    """Describe the kits in a ``prod_NN`` folder (from its copy of the project file)."""
    kits_dir = Path(kits_dir)
    source = project_file if project_file is not None else kits_dir / "project.yml"
    copy = kits_dir / "project.yml"
    data = _load_project(copy if copy.is_file() else source)
    server = next(p for p in data["participants"] if p["type"] == "server")
    sites = {p["name"]: kits_dir / p["name"] for p in data["participants"] if p["type"] == "client"}
    admins = {
        p["name"]: (p["role"], kits_dir / p["name"])
        for p in data["participants"]
        if p["type"] == "admin"
    }
    root_ca = kits_dir / server["name"] / "startup" / "rootCA.pem"
    return Federation(
        project=data["name"],
        kits_dir=kits_dir,
        server=server["name"],
        port=int(server.get("fed_learn_port", 8002)),
        sites=sites,
        admins=admins,
        root_ca_sha256=certificate_sha256(root_ca) if root_ca.is_file() else None,
    )
