"""The FLARE server workflow: FedAvg rounds in a fixed order, min_clients, models saved each round,
then evaluation: the final global model and every site's last local model at every site
(cross-site), and the final model saved with a signed manifest.

Results are collected for the whole round and summed in sorted site order (``fed_avg``), unlike
FLARE's built-in FedAvg which adds them as they arrive, so seeded runs are bit-reproducible.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.workflows.model_controller import ModelController

from jobs import keys
from jobs.components import SERVER_CONTROLLER, has_variable_references, written_args
from jobs.messages import MessageError, SiteResultMeta, TaskMeta, result_site
from jobs.model import ModelInitError, initial_weights, numpy_to_state
from jobs.spec import parse_spec
from jobs.transfer import pack_weights, unpack_weights, weight_layout
from server_app.aggregation import SiteUpdate, fed_avg, server_step
from server_app.history import (
    CrossSiteResult,
    RoundPhase,
    RunHistory,
    SiteRound,
    write_history,
)
from server_app.model_manifest import (
    load_provisioned_signer,
    simulation_signer,
    write_signed_manifest,
)

__all__ = [
    "FINAL_MODEL",
    "MODEL_STORE",
    "OUTPUT_FOLDER",
    "SIMULATION_MODEL_STORE_ENV",
    "FedSegController",
]

OUTPUT_FOLDER = "fedseg"
"""Folder in the server's run directory holding history.json, progress.jsonl and the models."""
SERVER_JOB_CONFIG = "config_fed_server.json"
MODEL_STORE = "models"
"""Folder in the server's ``local/`` where the weights a spec starts from (``model.init``) are
kept: the server reads a job's initial weights from there only."""
SIMULATION_MODEL_STORE_ENV = "FEDSEG_MODEL_STORE"
"""The server process's model store when set (fedseg's simulator sets it to the spec's folder;
a deployed server's operator may point it elsewhere); else ``local/models/``."""
FINAL_MODEL = "final_model.pt"
"""Saved with ``final_model.manifest.json`` and ``final_model.manifest.sig`` beside it."""


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
        self._job_spec = None  # parsed in run(), once the spec is known to be the job's own

    def _check_spec_as_written(self) -> None:
        """Stop a job whose spec FLARE filled in with the server's variables (``{$ENV_VAR}``
        references in its config): the run history, which the job's lead downloads, holds the
        spec, and would carry the server's values out. Nothing of the filled-in spec is echoed."""
        config = (
            Path(self.engine.get_workspace().get_app_config_dir(self.fl_ctx.get_job_id()))
            / SERVER_JOB_CONFIG
        )
        written = written_args(config, SERVER_CONTROLLER)
        if written != {"spec": self._spec} or has_variable_references(written):
            raise RuntimeError(
                "the job's spec holds FLARE variable references ({...}) that the server would "
                "fill in with its own values; fedseg refuses such a job (a fedseg spec never "
                "needs them)"
            )

    def _output_dir(self) -> Path:
        path = Path(self.get_run_dir()) / OUTPUT_FOLDER
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _save_model(self, weights: dict[str, np.ndarray], name: str) -> None:
        torch.save(numpy_to_state(weights), self._output_dir() / name)

    def _progress(self, record: SiteRound) -> None:
        with open(self._output_dir() / "progress.jsonl", "a") as stream:
            stream.write(json.dumps(record.model_dump()) + "\n")

    def _rejected(self, error: MessageError) -> str:
        """Why a site's result was not accepted (its metadata is untrusted input)."""
        reason = f"the server rejected the result: {error}"
        self.warning(reason)
        return reason

    def _collect(
        self, results: list[FLModel], round_index: int, sites: list[str], phase: RoundPhase
    ) -> tuple[list[SiteRound], list[SiteUpdate], dict[str, bool | None]]:
        """Each site's record of the round, the updates to aggregate, and whether each site
        allows its update to go to other sites (``keys.LOCAL_MODEL_SHAREABLE``)."""
        records, updates, shareable = [], [], {}
        responded = set()
        for result in results:
            site = result_site(result.meta)
            responded.add(site)
            try:
                meta = SiteResultMeta.from_meta(result.meta, source=str(site))
            except MessageError as error:
                records.append(SiteRound.rejected(site, round_index, self._rejected(error), phase))
                continue
            record = SiteRound.from_meta(site, round_index, meta, phase)
            records.append(record)
            shareable[site] = meta.local_model_shareable
            if record.refused is None and result.params:
                weights = unpack_weights(result.params, weight_layout(self._job_spec.model))
                updates.append(SiteUpdate(site, weights, int(record.num_patients)))
        records += [
            SiteRound.absent(site, round_index, phase) for site in sites if site not in responded
        ]
        records.sort(key=lambda record: record.site)
        for record in records:
            self._progress(record)
        return records, updates, shareable

    def _cross_site(
        self, local_models: dict[str, tuple[int, dict]], sites: list[str], final_index: int
    ) -> list[CrossSiteResult]:
        """Each site's last local model, sent as a ``validate`` task to every site."""
        matrix = []
        for owner in sorted(local_models):
            model_round, weights = local_models[owner]
            self.info(f"cross-site evaluation: {owner}'s local model at {sites}")
            results = self.send_model_and_wait(
                task_name=keys.TASK_VALIDATE,
                data=FLModel(
                    params=pack_weights(weights),
                    params_type=ParamsType.FULL,
                    meta=TaskMeta(round=final_index, model_owner=owner).to_meta(),
                ),
                timeout=self._job_spec.federation.round_timeout_s,
            )
            by_site = {result_site(result.meta): result.meta for result in results}
            for site in sites:
                matrix.append(self._cross_site_cell(owner, model_round, site, by_site.get(site)))
        return matrix

    def _cross_site_cell(
        self, owner: str, model_round: int, site: str, meta: dict | None
    ) -> CrossSiteResult:
        cell = {"model": owner, "model_round": model_round, "site": site}
        unknown = dict.fromkeys(
            ("val_dice", "val_hd95_mm", "val_hd95_missing", "val_lesion_volumes", "val_patients")
        )
        if meta is None:
            return CrossSiteResult(**cell, **unknown, missing=True)
        try:
            result = SiteResultMeta.from_meta(meta, source=site)
        except MessageError as error:
            return CrossSiteResult(**cell, **unknown, refused=self._rejected(error))
        return CrossSiteResult(
            **cell,
            val_dice=result.val_dice,
            val_hd95_mm=result.val_hd95_mm,
            val_hd95_missing=result.val_hd95_missing,
            val_lesion_volumes=result.val_lesion_volumes,
            val_patients=result.val_patients,
            refused=result.refused,
        )

    def _sign_final_model(self, history: RunHistory, contributors: set[str]) -> None:
        """Manifest beside final_model.pt, signed with the server's provisioned key when the
        startup kit has one, else (simulator) with a throwaway key marked "simulation"."""
        startup = Path(self.engine.get_workspace().get_startup_kit_dir())
        signer = load_provisioned_signer(startup)
        if signer is None:
            self.warning(
                f"no server.key/server.crt in {startup}: the final model is signed with a "
                "throwaway simulation key (integrity only, no provisioned identity)"
            )
            signer = simulation_signer()
        epsilon = {site: None for site in history.sites} | history.last_epsilon()
        write_signed_manifest(
            self._output_dir() / FINAL_MODEL,
            spec=self._spec,
            contributing_sites=sorted(contributors),
            epsilon_per_site={site: epsilon[site] for site in sorted(contributors)},
            rounds_completed=history.rounds_completed,
            signer=signer,
        )

    def _model_store(self) -> Path:
        """Where this server reads ``model.init`` from: its own ``local/models/``, or the folder
        its process environment names (``SIMULATION_MODEL_STORE_ENV``; fedseg's simulator sets
        it to the spec's folder). Either way the server's own side decides, never the job."""
        folder = os.environ.get(SIMULATION_MODEL_STORE_ENV)
        if folder:
            return Path(folder)
        return Path(self.engine.get_workspace().get_site_config_dir()) / MODEL_STORE

    def _answer_status_requests(self, history: RunHistory) -> None:
        """``fedseg job status`` asks a running job through FLARE's app command; the answer is
        the history so far (site names, rounds, metrics, epsilon, refusals: no patient data)."""

        def status(topic: str, data, fl_ctx) -> dict:
            # to_json holds JSON types only: FLARE's message encoding drops an answer holding
            # others (an enum), and the researcher then sees no rounds.
            return history.to_json()

        try:
            self.engine.register_app_command(keys.STATUS_COMMAND, status)
        except (AttributeError, RuntimeError) as error:  # e.g. the simulator's engine
            self.info(f"live status command not available: {error}")

    def run(self) -> None:
        self._check_spec_as_written()
        self._job_spec = parse_spec(self._spec, source="job config (spec)")
        spec = self._job_spec
        sites = sorted(client.name for client in self.engine.get_clients())
        rounds = spec.training.rounds
        history = RunHistory(
            job_name=spec.name, sites=sites, rounds_planned=rounds, spec=self._spec
        )
        history_path = self._output_dir() / "history.json"
        self._answer_status_requests(history)
        try:
            weights = initial_weights(
                spec.model, spec.training.seed, model_store=self._model_store()
            )
        except ModelInitError as error:  # the file's name and hash are the spec's own
            history.stopped_reason = f"the server refused the initial weights: {error}"
            self.warning(history.stopped_reason)
            write_history(history, history_path)
            return
        self._save_model(weights, "global_model_round_0.pt")
        mean_dice_by_model: dict[int, float] = {}
        # Each site's last aggregated local model (round, weights), kept for cross-site
        # evaluation only when the site allowed it (keys.LOCAL_MODEL_SHAREABLE).
        local_models: dict[str, tuple[int, dict]] = {}
        contributors: set[str] = set()
        velocity: dict[str, np.ndarray] = {}  # server momentum (FedAvgM); empty: none yet

        for round_index in range(rounds):
            self.info(f"round {round_index + 1}/{rounds}: sending the global model to {sites}")
            results = self.send_model_and_wait(
                task_name=keys.TASK_TRAIN,
                data=FLModel(
                    params=pack_weights(weights),
                    params_type=ParamsType.FULL,
                    current_round=round_index,
                    total_rounds=rounds,
                    meta=TaskMeta(round=round_index).to_meta(),
                ),
                timeout=spec.federation.round_timeout_s,
            )
            records, updates, shareable = self._collect(
                results, round_index, sites, RoundPhase.TRAIN
            )
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
            weights, velocity = server_step(
                weights,
                fed_avg(updates),
                velocity,
                lr=spec.federation.server_lr,
                momentum=spec.federation.server_momentum,
            )
            for update in updates:
                contributors.add(update.site)
                if shareable.get(update.site):
                    local_models[update.site] = (round_index, dict(update.weights))
                    history.cross_site_not_shared.pop(update.site, None)
                else:
                    local_models.pop(update.site, None)
                    history.cross_site_not_shared[update.site] = (
                        "the site did not allow its local model to be sent to other sites "
                        "(a site allows it for DP-trained models, or for any model when its "
                        "policy does not require DP)"
                    )
            history.rounds_completed = round_index + 1
            self._save_model(weights, f"global_model_round_{round_index + 1}.pt")
            write_history(history, history_path)

        final_index = history.rounds_completed
        results = self.send_model_and_wait(
            task_name=keys.TASK_VALIDATE,
            data=FLModel(
                params=pack_weights(weights),
                params_type=ParamsType.FULL,
                meta=TaskMeta(round=final_index, model_owner=keys.GLOBAL_MODEL).to_meta(),
            ),
            timeout=spec.federation.round_timeout_s,
        )
        history.final, _, _ = self._collect(results, final_index, sites, RoundPhase.FINAL)
        final_dice = _mean_dice(history.final)
        if final_dice is not None:
            mean_dice_by_model[final_index] = final_dice
        write_history(history, history_path)
        if spec.evaluation.cross_site:
            history.cross_site = self._cross_site(local_models, sites, final_index)
        if mean_dice_by_model:
            history.best_round = max(mean_dice_by_model, key=lambda k: (mean_dice_by_model[k], k))
            best = self._output_dir() / f"global_model_round_{history.best_round}.pt"
            (self._output_dir() / "best_model.pt").write_bytes(best.read_bytes())
        self._save_model(weights, FINAL_MODEL)
        write_history(history, history_path)
        self._sign_final_model(history, contributors)
        self.info(f"finished: {history.rounds_completed}/{rounds} rounds")
