"""The FLARE client executor: turns FLARE tasks into ``LocalJob`` calls at a site.

Referenced by class path from the installed package (never shipped inside a job), so a job stays
pure configuration. Only weights, counts, metrics and epsilon leave the site.
"""

from __future__ import annotations

import logging
from pathlib import Path

from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from jobs import keys
from jobs.spec import parse_spec
from jobs.transfer import pack_weights, unpack_weights, weight_layout
from site_app.local_job import LocalJob
from site_app.policy import SiteRefusal
from site_app.site_config import SITE_CONFIG_FILE, load_site_config

__all__ = ["SiteTrainer"]

log = logging.getLogger(__name__)


class SiteTrainer(Executor):
    """FLARE executor for fedseg's ``train`` and ``validate`` tasks.

    Args:
        spec: the JobSpec as plain data (``JobSpec.to_plain()``).
        site_config: path of the site's fedseg config; empty = the startup kit's
            ``<workspace>/local/fedseg_site.yaml``. The simulator passes one per simulated site.
        simulation: True only when run by fedseg's simulator; allows seeded DP noise.
    """

    def __init__(self, spec: dict, site_config: str = "", simulation: bool = False) -> None:
        super().__init__()
        # FedJob serialises constructor args from self._<arg>: keep the plain dict there.
        self._spec = spec
        self._job_spec = parse_spec(spec, source="job config (spec)")
        self._site_config = site_config
        self._simulation = simulation
        self._job: LocalJob | None = None
        self._refused: str | None = None

    def _local_job(self, fl_ctx: FLContext) -> LocalJob:
        if self._refused:
            raise SiteRefusal(self._refused)
        if self._job is None:
            workspace = fl_ctx.get_engine().get_workspace()
            root = Path(workspace.get_root_dir())
            config_path = Path(self._site_config or root / "local" / SITE_CONFIG_FILE)
            site = fl_ctx.get_identity_name()
            try:
                self._job = LocalJob(
                    spec=self._job_spec,
                    site=site,
                    config=load_site_config(config_path),
                    state_dir=root / "fedseg" / fl_ctx.get_job_id(),
                    simulation=self._simulation,
                    job_id=fl_ctx.get_job_id(),
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
            incoming.params = unpack_weights(incoming.params, weight_layout(self._job_spec.model))
            round_index = int(incoming.meta.get(keys.ROUND, incoming.current_round or 0))
            if task_name == keys.TASK_VALIDATE:
                # Subgroups only for the global model: another site's local model (cross-site
                # evaluation) gets site-level metrics only.
                owner = incoming.meta.get(keys.MODEL_OWNER, keys.GLOBAL_MODEL)
                meta = job.validate(incoming.params, subgroups=owner == keys.GLOBAL_MODEL)
                meta[keys.MODEL_OWNER] = owner
                meta[keys.EPSILON] = job.epsilon()
                outgoing = FLModel(params={}, params_type=ParamsType.FULL, meta=meta)
            else:
                weights, meta = job.train_round(incoming.params, round_index)
                outgoing = FLModel(
                    params=pack_weights(weights, self._job_spec.federation.transfer_dtype),
                    params_type=ParamsType.FULL,
                    meta=meta,
                    current_round=round_index,
                )
            return FLModelUtils.to_shareable(outgoing)
        except SiteRefusal as refusal:
            # A refusal is an answer, not a failure: the reason reaches the server and report.
            self.log_warning(fl_ctx, str(refusal))
            meta = {keys.REFUSED: str(refusal), keys.NUM_STEPS: 0, keys.EPSILON: None}
            return FLModelUtils.to_shareable(
                FLModel(params={}, params_type=ParamsType.FULL, meta=meta)
            )
        except Exception as error:
            # Our errors carry no patient data (ingestion names series by hash only).
            self.log_exception(fl_ctx, f"fedseg site task {task_name!r} failed: {error}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
