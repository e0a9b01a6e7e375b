"""JobSpec -> FLARE job: the one place that names the server and site components.

Components are referenced by class path from the installed fedseg package (``set_app_packages``),
so the exported job has no ``custom/`` code and sites that forbid BYOC accept it. The imports of
``server_app``/``site_app`` are deliberately local: ``jobs`` itself depends on neither.
"""

from __future__ import annotations

from pathlib import Path

from nvflare.job_config.api import FedJob
from nvflare.recipe.spec import Recipe

from jobs.spec import JobSpec

__all__ = ["APP_PACKAGES", "FedSegRecipe", "build_job"]

APP_PACKAGES = ["jobs", "site_app", "server_app"]
"""Packages installed at every site and at the server; never copied into a job."""


def build_job(
    spec: JobSpec,
    *,
    sites: list[str],
    site_configs: dict[str, Path] | None = None,
    simulation: bool = False,
) -> FedJob:
    """A FLARE job running ``spec`` on ``sites``.

    Args:
        site_configs: per-site fedseg config paths (simulation); None = each site reads the
            config in its startup kit (``local/fedseg_site.yaml``).
        simulation: allow seeded DP noise (only fedseg's simulator sets this).
    """
    from server_app.controller import FedSegController
    from site_app.executor import SiteTrainer

    job = FedJob(name=spec.name, min_clients=spec.federation.min_clients)
    job.set_app_packages(APP_PACKAGES)
    job.to_server(FedSegController(spec=spec.to_plain()))
    for site in sites:
        config = "" if site_configs is None else str(Path(site_configs[site]).resolve())
        executor = SiteTrainer(spec=spec.to_plain(), site_config=config, simulation=simulation)
        job.to(executor, site, tasks=["train", "validate"])
    return job


class FedSegRecipe(Recipe):
    """The fedseg job as a FLARE recipe: ``recipe.run(env)`` for SimEnv, PocEnv or ProdEnv."""

    def __init__(
        self,
        spec: JobSpec,
        *,
        sites: list[str],
        site_configs: dict[str, Path] | None = None,
        simulation: bool = False,
    ) -> None:
        super().__init__(
            build_job(spec, sites=sites, site_configs=site_configs, simulation=simulation)
        )
