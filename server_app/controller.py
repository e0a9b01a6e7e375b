"""The FLARE server workflow: FedAvg rounds in a fixed order, min_clients, models saved each round.

Results are collected for the whole round and summed in sorted site order (``fed_avg``), unlike
FLARE's built-in FedAvg which adds them as they arrive, so seeded runs are bit-reproducible.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.workflows.model_controller import ModelController

from jobs import keys
from jobs.model import initial_weights, numpy_to_state
from jobs.spec import parse_spec
from server_app.aggregation import SiteUpdate, fed_avg
from server_app.history import RunHistory, SiteRound, write_history

__all__ = ["OUTPUT_FOLDER", "FedSegController"]

OUTPUT_FOLDER = "fedseg"
"""Folder in the server's run directory holding history.json, progress.jsonl and the models."""


def _mean_dice(records: list[SiteRound]) -> float | None:
    values = [r.val_dice for r in records if r.val_dice is not None and not math.isnan(r.val_dice)]
    return float(np.mean(values)) if values else None


class FedSegController(ModelController):
    """Weighted FedAvg over site updates, then a final validation of the global model everywhere.

    Args:
        spec: the JobSpec as plain data (``JobSpec.to_plain()``).
    """

    def __init__(self, spec: dict) -> None:
        super().__init__(persistor_id="")  # models are saved by this controller, per round
        # FedJob serialises constructor args from self._<arg>: keep the plain dict there.
        self._spec = spec
        self._job_spec = parse_spec(spec, source="job config (spec)")

    def _output_dir(self) -> Path:
        path = Path(self.get_run_dir()) / OUTPUT_FOLDER
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _save_model(self, weights: dict[str, np.ndarray], name: str) -> None:
        torch.save(numpy_to_state(weights), self._output_dir() / name)

    def _progress(self, record: SiteRound) -> None:
        with open(self._output_dir() / "progress.jsonl", "a") as stream:
            stream.write(json.dumps(record.__dict__) + "\n")

    def _collect(self, results: list[FLModel], round_index: int, sites: list[str], phase: str):
        records, updates = [], []
        responded = set()
        for result in results:
            site = result.meta.get("client_name")
            responded.add(site)
            record = SiteRound.from_meta(site, round_index, result.meta, phase)
            records.append(record)
            if record.refused is None and result.params:
                updates.append(SiteUpdate(site, result.params, int(record.num_patients)))
        records += [
            SiteRound.absent(site, round_index, phase) for site in sites if site not in responded
        ]
        records.sort(key=lambda record: record.site)
        for record in records:
            self._progress(record)
        return records, updates

    def run(self) -> None:
        spec = self._job_spec
        sites = sorted(client.name for client in self.engine.get_clients())
        rounds = spec.training.rounds
        history = RunHistory(job_name=spec.name, sites=sites, rounds_planned=rounds)
        history_path = self._output_dir() / "history.json"
        weights = initial_weights(spec.model, spec.training.seed)
        self._save_model(weights, "global_model_round_0.pt")
        mean_dice_by_model: dict[int, float] = {}

        for round_index in range(rounds):
            self.info(f"round {round_index + 1}/{rounds}: sending the global model to {sites}")
            results = self.send_model_and_wait(
                task_name=keys.TASK_TRAIN,
                data=FLModel(
                    params=weights,
                    params_type=ParamsType.FULL,
                    current_round=round_index,
                    total_rounds=rounds,
                    meta={keys.ROUND: round_index},
                ),
                timeout=spec.federation.round_timeout_s,
            )
            records, updates = self._collect(results, round_index, sites, "train")
            history.rounds += records
            received = _mean_dice(records)  # validation of the model sent this round
            if received is not None:
                mean_dice_by_model[round_index] = received
            if len(updates) < spec.federation.min_clients:
                history.stopped_reason = (
                    f"round {round_index + 1}: {len(updates)} site update(s), fewer than "
                    f"federation.min_clients={spec.federation.min_clients}; "
                    + "; ".join(r.refused for r in records if r.refused)
                ).rstrip("; ")
                self.warning(history.stopped_reason)
                write_history(history, history_path)
                break
            weights = fed_avg(updates)
            history.rounds_completed = round_index + 1
            self._save_model(weights, f"global_model_round_{round_index + 1}.pt")
            write_history(history, history_path)

        final_index = history.rounds_completed
        results = self.send_model_and_wait(
            task_name=keys.TASK_VALIDATE,
            data=FLModel(
                params=weights, params_type=ParamsType.FULL, meta={keys.ROUND: final_index}
            ),
            timeout=spec.federation.round_timeout_s,
        )
        history.final, _ = self._collect(results, final_index, sites, "final")
        final_dice = _mean_dice(history.final)
        if final_dice is not None:
            mean_dice_by_model[final_index] = final_dice
        if mean_dice_by_model:
            history.best_round = max(mean_dice_by_model, key=lambda k: (mean_dice_by_model[k], k))
            best = self._output_dir() / f"global_model_round_{history.best_round}.pt"
            (self._output_dir() / "best_model.pt").write_bytes(best.read_bytes())
        self._save_model(weights, "final_model.pt")
        write_history(history, history_path)
        self.info(f"finished: {history.rounds_completed}/{rounds} rounds")
