"""Who this site is running as: a deployed hospital site, or a site of fedseg's simulator.

Decided by the site alone, never by the job: a deployed site reads only its own
``<workspace>/local/fedseg_site.yaml``; a simulated site is one that FLARE's simulator runs
(FLARE marks its context, which a job cannot) *and* that fedseg's simulator started with the
folder of the simulated sites' configs in its environment. Only simulation may seed DP noise.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from site_app.site_config import SITE_CONFIG_FILE

__all__ = ["SIMULATION_SITE_CONFIGS_ENV", "SiteMode", "decide_site_mode"]

log = logging.getLogger(__name__)

SIMULATION_SITE_CONFIGS_ENV = "FEDSEG_SIMULATION_SITE_CONFIGS"
"""Set by ``simulator.federation.run_simulation`` for its site processes: the folder holding one
``<site>.yaml`` config per simulated site. Ignored outside FLARE's simulator."""


@dataclass(frozen=True)
class SiteMode:
    """How this site process runs a job."""

    simulation: bool
    """True only for a site of fedseg's simulator (seeded DP noise allowed)."""
    config_path: Path
    """The site config this process reads."""


def decide_site_mode(
    *,
    workspace_root: Path,
    site: str,
    flare_simulator: bool,
    environ: Mapping[str, str] = os.environ,
) -> SiteMode:
    """The mode and config of site ``site`` (pure but for a log line).

    Args:
        workspace_root: the site's FLARE workspace (its startup kit when deployed).
        flare_simulator: FLARE's own mark that this process is its simulator
            (``FLContextKey.SIMULATE_MODE``), which no job content can set.
    """
    configs = environ.get(SIMULATION_SITE_CONFIGS_ENV)
    if flare_simulator and configs:
        return SiteMode(simulation=True, config_path=Path(configs) / f"{site}.yaml")
    if configs:
        log.warning(
            "%s is set but this is not FLARE's simulator: ignored; site %s reads its own local/%s",
            SIMULATION_SITE_CONFIGS_ENV,
            site,
            SITE_CONFIG_FILE,
        )
    return SiteMode(simulation=False, config_path=Path(workspace_root) / "local" / SITE_CONFIG_FILE)
