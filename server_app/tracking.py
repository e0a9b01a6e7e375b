"""Experiment tracking at the server: the sites' metrics events as TensorBoard files, and the
federation's own per-round scalars (from the run history) that every tracker records.

FLARE's own receiver with its settings fixed here (a job cannot point it at another folder).
"""

from __future__ import annotations

from nvflare.apis.analytix import ANALYTIC_EVENT_TYPE
from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver

from jobs.components import TB_FOLDER
from server_app.history import RunHistory

__all__ = ["MLFLOW_FOLDER", "MLFLOW_STORE_ENV", "ServerTensorBoardReceiver", "federation_scalars"]

MLFLOW_FOLDER = "mlflow"
"""The server's MLflow store in its run folder (``server_app.mlflow_tracking``), unless its
process environment names another (``MLFLOW_STORE_ENV``)."""
MLFLOW_STORE_ENV = "FEDSEG_MLFLOW_STORE"
"""A folder for the server's MLflow store, set by the server's operator (fedseg's simulator sets
it to ``<out>/mlflow``); never by a job."""


class ServerTensorBoardReceiver(TBAnalyticsReceiver):
    """Writes every site's forwarded metrics events under ``TB_FOLDER`` of the server's run
    folder, one sub-folder per site; takes no arguments."""

    def __init__(self) -> None:
        super().__init__(
            tb_folder=TB_FOLDER, events=[ANALYTIC_EVENT_TYPE, f"fed.{ANALYTIC_EVENT_TYPE}"]
        )


def federation_scalars(history: RunHistory) -> list[tuple[str, float, int]]:
    """(tag, value, step) of the federation as a whole, step = rounds done (pure).

    ``federation/mean_val_dice``: mean over sites of the Dice of the global model after k
    rounds; ``federation/site_updates``: updates aggregated in round k; ``federation/
    max_epsilon``: the largest epsilon any site reported after round k.
    """
    by_model: dict[int, list[float]] = {}
    for record in [*history.rounds, *history.final]:
        if record.val_dice is not None and not record.missing:
            by_model.setdefault(record.round, []).append(record.val_dice)
    scalars = [
        ("federation/mean_val_dice", sum(values) / len(values), step)
        for step, values in sorted(by_model.items())
    ]
    for round_index in range(history.rounds_completed):
        records = [r for r in history.rounds if r.round == round_index]
        updates = sum(1 for r in records if not r.refused and not r.missing)
        scalars.append(("federation/site_updates", float(updates), round_index + 1))
        epsilons = [r.epsilon for r in records if r.epsilon is not None]
        if epsilons:
            scalars.append(("federation/max_epsilon", max(epsilons), round_index + 1))
    return scalars
