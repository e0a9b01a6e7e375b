"""Experiment tracking at the server: the sites' metrics events as TensorBoard files.

FLARE's own receiver with its settings fixed here (a job cannot point it at another folder).
"""

from __future__ import annotations

from nvflare.apis.analytix import ANALYTIC_EVENT_TYPE
from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver

from jobs.components import TB_FOLDER

__all__ = ["ServerTensorBoardReceiver"]


class ServerTensorBoardReceiver(TBAnalyticsReceiver):
    """Writes every site's forwarded metrics events under ``TB_FOLDER`` of the server's run
    folder, one sub-folder per site; takes no arguments."""

    def __init__(self) -> None:
        super().__init__(
            tb_folder=TB_FOLDER, events=[ANALYTIC_EVENT_TYPE, f"fed.{ANALYTIC_EVENT_TYPE}"]
        )
