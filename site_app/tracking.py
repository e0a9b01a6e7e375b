"""Experiment tracking at a site: each task's metrics become TensorBoard scalars via FLARE.

A FLARE component that watches the site's own task results (no change to the executor): after a
``train`` or ``validate`` task it fires FLARE analytics events (``TBWriter`` syntax). A site-local
``SiteTensorBoardReceiver`` writes them into the site's run folder; ``MetricsToServer`` forwards
them to the server's receiver. They carry only what the task result already sends the server:
validation Dice and HD95, training loss and epsilon, never patient data.

The receiver and the forwarder are FLARE's own classes with their settings fixed here, so a job
cannot point them elsewhere (another folder, or other local events to forward to the server).
"""

from __future__ import annotations

import math

from nvflare.apis.analytix import ANALYTIC_EVENT_TYPE, AnalyticsDataType, LogWriterName
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.app_common.widgets.convert_to_fed_event import ConvertToFedEvent
from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver

from jobs import keys
from jobs.components import TB_FOLDER
from jobs.messages import SiteResultMeta, TaskMeta

__all__ = [
    "TRACKED_TAGS",
    "MetricsToServer",
    "SiteMetricsTracker",
    "SiteTensorBoardReceiver",
    "round_scalars",
]

TRACKED_TAGS = (keys.VAL_DICE, keys.VAL_HD95_MM, keys.TRAIN_LOSS, keys.EPSILON)
"""Scalar tags a site writes; TensorBoard shows one chart per tag with one line per site."""


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def round_scalars(task_name: str, round_index: int, meta: dict) -> list[tuple[str, float, int]]:
    """(tag, value, step) for one task result; step = global rounds completed (pure).

    The x axis is "rounds of aggregation behind the model": ``val_dice`` and ``val_hd95_mm``
    (mm) of the global model a site received at round r (0-based) are plotted at step r
    (0 = untrained), the final validation at the number of completed rounds; ``train_loss`` and
    ``epsilon`` after training round r at step r + 1. Missing values (a refused round, no lesion
    in the held-out set) are left out, and so is the validation of another site's model
    (cross-site evaluation), which is not the global model.
    """
    result = SiteResultMeta.from_meta(meta, source="this site")
    if result.owner != keys.GLOBAL_MODEL:
        return []
    scalars = []
    for tag, value in ((keys.VAL_DICE, result.val_dice), (keys.VAL_HD95_MM, result.val_hd95_mm)):
        if _finite(value):
            scalars.append((tag, float(value), round_index))
    if task_name == keys.TASK_TRAIN and not result.refused:
        for tag, value in ((keys.TRAIN_LOSS, result.train_loss), (keys.EPSILON, result.epsilon)):
            if _finite(value):
                scalars.append((tag, float(value), round_index + 1))
    return scalars


class SiteMetricsTracker(FLComponent):
    """Turns each ``train``/``validate`` result of this site into FLARE analytics events.

    Needs, in the same site app, a ``SiteTensorBoardReceiver`` (site-local event files) and/or
    ``MetricsToServer`` (the server's event files); ``researcher_app.flare_job.build_job`` adds
    both.
    """

    def __init__(self) -> None:
        super().__init__()
        self._round: int | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.BEFORE_TASK_EXECUTION:
            self._round = self._incoming_round(fl_ctx)
        elif event_type == EventType.AFTER_TASK_EXECUTION:
            try:
                self._send(fl_ctx)
            except Exception as error:  # tracking must never fail a training round
                self.log_warning(fl_ctx, f"fedseg tracking skipped a result: {error}")

    @staticmethod
    def _incoming_round(fl_ctx: FLContext) -> int | None:
        task_data = fl_ctx.get_prop(FLContextKey.TASK_DATA)
        if task_data is None:
            return None
        try:
            incoming = FLModelUtils.from_shareable(task_data)
        except Exception:  # not an FLModel task: nothing of ours to track
            return None
        task = TaskMeta.from_meta(incoming.meta)
        value = task.round if task.round is not None else incoming.current_round
        return None if value is None else int(value)

    def _send(self, fl_ctx: FLContext) -> None:
        task_name = fl_ctx.get_prop(FLContextKey.TASK_NAME)
        reply = fl_ctx.get_prop(FLContextKey.TASK_RESULT)
        if task_name not in (keys.TASK_TRAIN, keys.TASK_VALIDATE) or reply is None:
            return
        if self._round is None or reply.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return
        meta = FLModelUtils.from_shareable(reply).meta
        for tag, value, step in round_scalars(task_name, self._round, meta):
            dxo = create_analytic_dxo(
                tag=tag,
                value=value,
                data_type=AnalyticsDataType.SCALAR,
                writer=LogWriterName.TORCH_TB,
                global_step=step,
            )
            send_analytic_dxo(self, dxo=dxo, fl_ctx=fl_ctx, event_type=ANALYTIC_EVENT_TYPE)


class SiteTensorBoardReceiver(TBAnalyticsReceiver):
    """FLARE's TensorBoard receiver writing this site's metrics events under ``TB_FOLDER`` of the
    site's run folder; takes no arguments."""

    def __init__(self) -> None:
        super().__init__(tb_folder=TB_FOLDER, events=[ANALYTIC_EVENT_TYPE])


class MetricsToServer(ConvertToFedEvent):
    """FLARE's event forwarder, for the metrics events only (what the task results already
    send the server); takes no arguments."""

    def __init__(self) -> None:
        super().__init__(events_to_convert=[ANALYTIC_EVENT_TYPE])
