"""The FLARE client executor: turns FLARE tasks into ``LocalJob`` calls at a site.

Referenced by class path from the installed package (never shipped inside a job), so a job stays
pure configuration. Only weights, counts, metrics and epsilon leave the site.

What a job may set here is the spec (what to train), nothing else: the site's config and its
mode (deployed or simulated) are the site's own (``site_app.site_mode``). A job that tries to set
anything else, or whose spec FLARE rewrote with this site's variables (``{$VAR}`` references in
the job's config), is refused with a reason the researcher sees in ``fedseg job status``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from jobs import keys
from jobs.components import SITE_EXECUTOR, has_variable_references, written_args
from jobs.messages import SiteResultMeta, TaskMeta
from jobs.spec import JobSpecError, parse_spec
from jobs.transfer import pack_weights, unpack_weights, weight_layout
from site_app.local_job import LocalJob
from site_app.policy import SiteRefusal
from site_app.site_config import load_site_config, site_private_dir
from site_app.site_mode import decide_site_mode

__all__ = ["SiteTrainer"]

log = logging.getLogger(__name__)

CLIENT_JOB_CONFIG = "config_fed_client.json"


class SiteTrainer(Executor):
    """FLARE executor for fedseg's ``train`` and ``validate`` tasks.

    Args:
        spec: the JobSpec as plain data (``JobSpec.to_plain()``): what to train.
        job_settings: nothing else is accepted from a job. Any other argument (e.g. the
            ``site_config`` path or ``simulation`` flag that older fedseg versions took from
            the job) makes the site refuse the job.
    """

    def __init__(self, spec: dict, **job_settings) -> None:
        super().__init__()
        # FedJob serialises constructor args from self._<arg>: keep the plain dict there.
        self._spec = spec
        self._unexpected_settings = job_settings
        self._job: LocalJob | None = None
        self._refused: str | None = None

    def _check_unrewritten(self, fl_ctx: FLContext, site: str) -> None:
        """Refuse a spec that FLARE rewrote with this site's variables: the job's config may
        reference environment variables as ``{$NAME}``, and any spec value echoed back (a
        refusal naming the job, say) would carry the site's secrets to the server."""
        workspace = fl_ctx.get_engine().get_workspace()
        config_dir = Path(workspace.get_app_config_dir(fl_ctx.get_job_id()))
        raw = written_args(config_dir / CLIENT_JOB_CONFIG, SITE_EXECUTOR)
        if raw is None:
            raise SiteRefusal(
                f"site {site} refuses the job: its {CLIENT_JOB_CONFIG} has no {SITE_EXECUTOR} "
                "the site could read back"
            )
        if raw != {"spec": self._spec} or has_variable_references(raw):
            raise SiteRefusal(
                f"site {site} refuses the job: its spec holds FLARE variable references "
                "({...}), which the site would fill in with its own values; a fedseg spec "
                "never needs them"
            )

    def _local_job(self, fl_ctx: FLContext) -> LocalJob:
        if self._refused:
            raise SiteRefusal(self._refused)
        if self._job is None:
            workspace = fl_ctx.get_engine().get_workspace()
            root = Path(workspace.get_root_dir())
            site = fl_ctx.get_identity_name()
            try:
                if self._unexpected_settings:
                    settings = ", ".join(sorted(self._unexpected_settings))
                    raise SiteRefusal(
                        f"site {site} refuses the job: it sets {settings} for the site's "
                        "executor; a site reads only its own local/fedseg_site.yaml and decides "
                        "its own mode (deployed or simulated); submit the job `fedseg job submit` "
                        "builds"
                    )
                self._check_unrewritten(fl_ctx, site)
                # Parsed only now: an error message quotes values, which must be the job's own.
                try:
                    spec = parse_spec(self._spec, source="job config (spec)")
                except JobSpecError as error:
                    raise SiteRefusal(f"site {site} refuses the job: {error}") from None
                mode = decide_site_mode(
                    workspace_root=root,
                    site=site,
                    flare_simulator=bool(fl_ctx.get_prop(FLContextKey.SIMULATE_MODE, False)),
                )
                config = load_site_config(mode.config_path)
                self._job = LocalJob(
                    spec=spec,
                    site=site,
                    config=config,
                    state_dir=root / "fedseg" / fl_ctx.get_job_id(),
                    simulation=mode.simulation,
                    job_id=fl_ctx.get_job_id(),
                    private_dir=site_private_dir(config, root),
                )
            except SiteRefusal as refusal:
                self._refused = str(refusal)  # the same answer for every later task of the job
                raise
        return self._job

    def execute(
        self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal
    ) -> Shareable:
        if task_name not in (keys.TASK_TRAIN, keys.TASK_VALIDATE):
            return make_reply(ReturnCode.TASK_UNKNOWN)
        try:
            job = self._local_job(fl_ctx)
            incoming = FLModelUtils.from_shareable(shareable)
            incoming.params = unpack_weights(incoming.params, weight_layout(job.spec.model))
            task = TaskMeta.from_meta(incoming.meta)
            round_index = task.round if task.round is not None else int(incoming.current_round or 0)
            if task_name == keys.TASK_VALIDATE:
                meta = job.validate_task(incoming.params, task.owner)
                outgoing = FLModel(params={}, params_type=ParamsType.FULL, meta=meta)
            else:
                weights, meta = job.train_round(incoming.params, round_index)
                outgoing = FLModel(
                    params=pack_weights(weights, job.spec.federation.transfer_dtype),
                    params_type=ParamsType.FULL,
                    meta=meta,
                    current_round=round_index,
                )
            return FLModelUtils.to_shareable(outgoing)
        except SiteRefusal as refusal:
            # A refusal is an answer, not a failure: the reason reaches the server and report.
            self.log_warning(fl_ctx, str(refusal))
            meta = SiteResultMeta(refused=str(refusal), num_steps=0, epsilon=None).to_meta()
            return FLModelUtils.to_shareable(
                FLModel(params={}, params_type=ParamsType.FULL, meta=meta)
            )
        except Exception as error:
            # Our errors carry no patient data (ingestion names series by hash only).
            self.log_exception(fl_ctx, f"fedseg site task {task_name!r} failed: {error}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
