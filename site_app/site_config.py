"""The site's own configuration: where its data is and what its privacy policy allows.

Loaded by the site only (never sent to the server). In a startup kit it lives at
``local/fedseg_site.yaml``; the simulator writes one per simulated site.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jobs.kit_layout import SITE_CONFIG_FILE
from jobs.validation_errors import format_validation_error
from site_app.policy import PrivacyPolicy

__all__ = [
    "SITE_CONFIG_FILE",
    "SiteConfig",
    "SiteConfigError",
    "load_site_config",
    "site_private_dir",
]


class SiteConfigError(ValueError):
    """The site configuration cannot be used; the message names the field and the file."""


class SiteConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    data_dir: Path
    """Folder of the site's DICOM (read only; fedseg never writes into it)."""
    cache_dir: Path | None = None
    """Where decoded volumes and parsed headers are cached; default ``<private_dir>/cache``."""
    private_dir: Path | None = None
    """Folder for what must stay out of reach of FLARE's file commands (the cache, which holds
    header fields such as UIDs, sex and age, and each job's quarantine list, which names files
    of the data folder); default ``<workspace>-private`` beside the FLARE workspace (FLARE's
    ``ls``/``cat``/``grep`` only read inside the workspace, and provisioning gives no role a
    shell anyway)."""
    policy: PrivacyPolicy = PrivacyPolicy()
    """What this site allows (DP required, epsilon per job, minimum noise, delta, accountants)."""
    num_threads: Annotated[int, Field(ge=0)] = 0
    """CPU threads for training; 0 = torch's default."""
    ledger: Path | None = None
    """The site's epsilon ledger (all jobs); default ``<workspace>/fedseg/epsilon_ledger.jsonl``."""
    signing_key: Path | None = None
    """Ed25519 key that signs the ledger; default ``<workspace>/fedseg/site_key.pem``, created
    on first use. Keep it readable only by the site's service account."""


def load_site_config(path: Path | str) -> SiteConfig:
    path = Path(path)
    if not path.is_file():
        raise SiteConfigError(
            f"{path}: site config not found; create it with at least 'data_dir: /path/to/dicom' "
            f"(in a startup kit it belongs in local/{SITE_CONFIG_FILE})"
        )
    try:
        data = yaml.safe_load(path.read_text())
        config = SiteConfig.model_validate(data)
    except yaml.YAMLError as error:
        raise SiteConfigError(f"{path}: not valid YAML ({error}); fix the syntax") from None
    except ValidationError as error:
        raise SiteConfigError(
            format_validation_error(error, str(path), document="the site config")
        ) from None
    # Relative paths are relative to the config file, never to wherever the site was started.
    relative = {
        name: (path.parent / value).resolve()
        for name in ("data_dir", "cache_dir", "private_dir", "ledger", "signing_key")
        if (value := getattr(config, name)) is not None and not value.is_absolute()
    }
    return config.model_copy(update=relative) if relative else config


def site_private_dir(config: SiteConfig, workspace_root: Path) -> Path:
    """Where the site keeps its cache and quarantine lists: outside the FLARE workspace."""
    workspace_root = Path(workspace_root).resolve()
    return config.private_dir or workspace_root.parent / f"{workspace_root.name}-private"
