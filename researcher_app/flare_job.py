"""JobSpec -> FLARE job: the one place that names the server and site components.

Components are referenced by class path from the installed fedseg package (``set_app_packages``),
so the exported job has no ``custom/`` code and sites that forbid BYOC accept it. The imports of
``server_app``/``site_app`` are deliberately local: ``jobs`` itself depends on neither.

Experiment tracking uses FLARE's own components with fedseg's fixed settings: each site's
``SiteMetricsTracker`` fires analytics events, a site-local ``SiteTensorBoardReceiver`` writes
them into the site's run folder and ``MetricsToServer`` forwards them to the server's
``ServerTensorBoardReceiver`` (one TensorBoard run per site under ``<server run dir>/tb_events/``).
With ``tracking.mlflow`` the server's ``ServerMLflowReceiver`` records the same forwarded events
in the server's own MLflow store; nothing more leaves a site.

Only the components of ``jobs.components`` are used: they are what every participant's
allow-list admits. The spec is the one thing a job carries; the site's config and mode are the
site's own (``site_app.site_mode``).
"""

from __future__ import annotations

from nvflare.job_config.api import FedJob
from nvflare.recipe.spec import Recipe

from jobs.components import TB_FOLDER
from jobs.spec import JobSpec

__all__ = ["APP_PACKAGES", "TB_FOLDER", "FedSegRecipe", "build_job"]

APP_PACKAGES = ["jobs", "site_app", "server_app"]
"""Packages installed at every site and at the server; never copied into a job."""


def _add_tracking(job: FedJob, sites: list[str], *, mlflow: bool) -> None:
    """FLARE's tracking: site events -> site TensorBoard files, and -> the server's TensorBoard
    files (and, with ``mlflow``, the server's MLflow store)."""
    from server_app.tracking import ServerTensorBoardReceiver
    from site_app.tracking import MetricsToServer, SiteMetricsTracker, SiteTensorBoardReceiver

    job.to_server(ServerTensorBoardReceiver(), id="tb_receiver")
    if mlflow:
        from server_app.mlflow_tracking import ServerMLflowReceiver

        job.to_server(ServerMLflowReceiver(), id="mlflow_receiver")
    for site in sites:
        job.to(SiteMetricsTracker(), site, id="metrics_tracker")
        job.to(SiteTensorBoardReceiver(), site, id="tb_receiver")
        job.to(MetricsToServer(), site, id="event_to_fed")


def build_job(spec: JobSpec, *, sites: list[str], tracking: bool = True) -> FedJob:
    """A FLARE job running ``spec`` on ``sites``; the same job for the simulator, a POC and
    production (each site finds its own config: ``site_app.site_mode``).

    Args:
        tracking: write TensorBoard event files at the server and at every site, and record
            the job in the server's MLflow store when the spec asks (``tracking.mlflow``);
            False turns all tracking off.
    """
    from server_app.controller import FedSegController
    from site_app.executor import SiteTrainer

    job = FedJob(name=spec.name, min_clients=spec.federation.min_clients)
    job.set_app_packages(APP_PACKAGES)
    job.to_server(FedSegController(spec=spec.to_plain()))
    for site in sites:
        job.to(SiteTrainer(spec=spec.to_plain()), site, tasks=["train", "validate"])
    if tracking:
        _add_tracking(job, sites, mlflow=spec.tracking.mlflow)
    return job


class FedSegRecipe(Recipe):
    """The fedseg job as a FLARE recipe: ``recipe.run(env)`` for SimEnv, PocEnv or ProdEnv."""

    def __init__(self, spec: JobSpec, *, sites: list[str], tracking: bool = True) -> None:
        super().__init__(build_job(spec, sites=sites, tracking=tracking))
