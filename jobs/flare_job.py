"""JobSpec -> FLARE job: the one place that names the server and site components.

Components are referenced by class path from the installed fedseg package (``set_app_packages``),
so the exported job has no ``custom/`` code and sites that forbid BYOC accept it. The imports of
``server_app``/``site_app`` are deliberately local: ``jobs`` itself depends on neither.

Experiment tracking uses FLARE's own components: each site's ``SiteMetricsTracker`` fires
analytics events, a site-local ``TBAnalyticsReceiver`` writes them into the site's run folder and
``ConvertToFedEvent`` forwards them to the server's ``TBAnalyticsReceiver`` (one TensorBoard run
per site under ``<server run dir>/tb_events/``).
"""

from __future__ import annotations

from pathlib import Path

from nvflare.job_config.api import FedJob
from nvflare.recipe.spec import Recipe

from jobs.spec import JobSpec

__all__ = ["APP_PACKAGES", "TB_FOLDER", "FedSegRecipe", "build_job"]

APP_PACKAGES = ["jobs", "site_app", "server_app"]
"""Packages installed at every site and at the server; never copied into a job."""

TB_FOLDER = "tb_events"
"""TensorBoard event folder in each run directory (server and sites), one sub-folder per site."""


def _add_tracking(job: FedJob, sites: list[str]) -> None:
    """FLARE's TensorBoard tracking: site events -> site files, and -> server files."""
    from nvflare.apis.analytix import ANALYTIC_EVENT_TYPE
    from nvflare.app_common.widgets.convert_to_fed_event import ConvertToFedEvent
    from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver

    from site_app.tracking import SiteMetricsTracker

    job.to_server(TBAnalyticsReceiver(tb_folder=TB_FOLDER), id="tb_receiver")
    for site in sites:
        job.to(SiteMetricsTracker(), site, id="metrics_tracker")
        job.to(
            TBAnalyticsReceiver(tb_folder=TB_FOLDER, events=[ANALYTIC_EVENT_TYPE]),
            site,
            id="tb_receiver",
        )
        job.to(ConvertToFedEvent(events_to_convert=[ANALYTIC_EVENT_TYPE]), site, id="event_to_fed")


def build_job(
    spec: JobSpec,
    *,
    sites: list[str],
    site_configs: dict[str, Path] | None = None,
    simulation: bool = False,
    tracking: bool = True,
) -> FedJob:
    """A FLARE job running ``spec`` on ``sites``.

    Args:
        site_configs: per-site fedseg config paths (simulation); None = each site reads the
            config in its startup kit (``local/fedseg_site.yaml``).
        simulation: allow seeded DP noise (only fedseg's simulator sets this).
        tracking: write TensorBoard event files at the server and at every site.
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
    if tracking:
        _add_tracking(job, sites)
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
        tracking: bool = True,
    ) -> None:
        super().__init__(
            build_job(
                spec,
                sites=sites,
                site_configs=site_configs,
                simulation=simulation,
                tracking=tracking,
            )
        )
