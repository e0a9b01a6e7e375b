"""One job at one site: data, model, DP training and the on-disk state that survives restarts.

FLARE-free, so it can be tested directly; ``site_app.executor`` adapts it to FLARE tasks.

One module of about 580 lines on purpose: the job's checks (policy, whole-job epsilon against the
ledger, state against the ledger), its generators and its training round all read and write the
same per-job state (``dp_state.pt``, the ledger reservation, the released count), and the order
in which they do so is the privacy argument; split, that order would be spread over modules.
The pieces without that state already live elsewhere (``privacy``, ``training``, ``ledger``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from jobs import keys
from jobs.messages import SiteResultMeta
from jobs.model import (
    build_network,
    freeze_untrainable,
    numpy_to_state,
    state_to_numpy,
    unmatched_trainable_patterns,
)
from jobs.seeds import derived_seed
from jobs.spec import JobSpec
from site_app.dataset import PatientCropDataset, prepare_patients, split_patients
from site_app.evaluation import evaluate_patients, summarize
from site_app.fingerprint import fingerprint_of, fingerprint_path, write_fingerprint
from site_app.ingestion import ingest_site
from site_app.ledger import EpsilonLedger, LedgerTampered, generate_site_key
from site_app.policy import SiteRefusal, default_max_delta, job_policy_problems
from site_app.privacy import (
    DPSettings,
    DPState,
    PrivateTraining,
    dp_loader,
    epsilon_spent,
    projected_epsilon,
    release_patient_count,
    resolve_dp_settings,
    unseeded_generator,
)
from site_app.quarantine import write_quarantine
from site_app.site_config import SiteConfig
from site_app.subgroups import patient_groups, subgroup_cells
from site_app.training import (
    OnDevice,
    apply_placement,
    device_placement,
    make_loss,
    make_optimizer,
    round_learning_rates,
    sites_sharing_device,
    train_epochs,
    use_cpu_threads,
)

__all__ = ["LocalJob", "SiteDataError"]

log = logging.getLogger(__name__)


class SiteDataError(RuntimeError):
    """The site cannot take part: no usable data. The message says what to check."""


def _spec_fingerprint(spec: JobSpec) -> str:
    return hashlib.sha256(json.dumps(spec.to_plain(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class _Generators:
    sampler: torch.Generator
    noise: torch.Generator


class LocalJob:
    """A site's side of one federated job.

    Args:
        spec: the job spec (identical at every site).
        site: this site's name (used only to derive simulation seeds).
        config: the site's own configuration (data path, privacy policy).
        state_dir: per-job folder in the site workspace; DP state is kept here. The site's
            ledger and key default to its parent folder (shared by all jobs).
        simulation: True only in the simulator; then a seeded spec also seeds DP noise.
        job_id: how this run is named in the site's epsilon ledger (FLARE's job id).
        private_dir: the site's folder out of FLARE's reach (``site_config.site_private_dir``):
            the job's quarantine list and data fingerprint (``site_app.fingerprint``) go to
            ``<private_dir>/<job id>/``, and the cache
            defaults to ``<private_dir>/cache``. None = ``state_dir``'s parent (tests, tools).
    """

    def __init__(
        self,
        *,
        spec: JobSpec,
        site: str,
        config: SiteConfig,
        state_dir: Path,
        simulation: bool,
        job_id: str | None = None,
        private_dir: Path | None = None,
    ) -> None:
        self.spec = spec
        self.job_id = job_id or spec.name
        self.site = site
        self.config = config
        self.state_dir = state_dir
        self.simulation = simulation
        problems = job_policy_problems(spec, config.policy)
        if problems:  # refused before a single file of patient data is read
            raise SiteRefusal(f"site {site} refuses job {spec.name}: " + "; ".join(problems))
        self.ledger = self._open_ledger() if spec.privacy.enabled else None
        if config.num_threads:
            use_cpu_threads(config.num_threads)

        private = private_dir if private_dir is not None else state_dir.parent
        ingested = ingest_site(config.data_dir, cache_dir=config.cache_dir or private / "cache")
        quarantine_path = private / self.job_id / "quarantine.json"
        write_quarantine(list(ingested.quarantine), quarantine_path)
        log.info(
            "%s: %d usable patients, %d quarantined item(s) (see %s)",
            site,
            len(ingested.patients),
            len(ingested.quarantine),
            quarantine_path,
        )
        patients = prepare_patients(ingested.patients, spec.data)
        # Subgroup labels (sex, age band, vendor, thickness band) stay here, keyed locally.
        self._groups = {record.patient_key: patient_groups(record) for record in ingested.patients}
        self.train_patients, self.val_patients = split_patients(
            patients, val_fraction=spec.data.val_fraction, seed=spec.training.seed
        )
        if not self.train_patients:
            raise SiteDataError(
                f"site {site}: no usable labelled patients in the data folder; "
                "run `fedseg site check --data DIR` to see what was quarantined and why"
            )
        # Aggregates of what this job trains on, for `fedseg site drift`; stays at the site.
        write_fingerprint(
            fingerprint_of(ingested, job=self.job_id), fingerprint_path(private, self.job_id)
        )

        self._state_path = state_dir / "dp_state.pt"
        self._fingerprint = _spec_fingerprint(spec)
        self.state = DPState.load(self._state_path)
        if self.state.rounds_done and self.state.rng_states.get("spec") != self._fingerprint:
            raise RuntimeError(
                f"{self._state_path} belongs to a different job spec; "
                "use a fresh workspace for a new job"
            )
        self._build_training()

    # -- setup -----------------------------------------------------------------------------------

    def _seed_for(self, purpose: str) -> int | None:
        seed = self.spec.training.seed
        return None if seed is None else derived_seed(seed, self.site, purpose)

    def _generator(self, purpose: str, *, secret: bool, device="cpu") -> torch.Generator:
        seed = self._seed_for(purpose)
        # DP's randomness (who is sampled, the noise) is seeded only in simulation.
        if seed is None or (secret and not self.simulation):
            return unseeded_generator(device)
        return torch.Generator(device=device).manual_seed(seed)

    def _build_training(self) -> None:
        training = self.spec.training
        # Crops are per-patient randomness of the DP mechanism (dataset docstring): seeded
        # only in simulation; a deployed site draws its crop seed from the OS, once per job,
        # and keeps it with the job's state (restarts continue the same crops).
        crop_seed = self._seed_for("crops") if self.simulation else None
        if self.state.rounds_done:
            crop_seed = int(self.state.rng_states["crop_seed"])
        elif crop_seed is None:
            crop_seed = int(unseeded_generator().initial_seed())
        self.dataset = PatientCropDataset(
            self.train_patients,
            roi_size=self.spec.model.roi_size,
            lesion_crop_fraction=self.spec.data.lesion_crop_fraction,
            seed=crop_seed,
            crops_per_patient=training.crops_per_patient,
        )
        dp = self.spec.privacy.enabled
        # Every site on the one GPU when there is one, with a bounded share of its memory.
        self.placement = device_placement(
            cuda_available=torch.cuda.is_available(), sites_sharing=sites_sharing_device()
        )
        self.device = apply_placement(self.placement, deterministic=self.simulation)
        self.generators = _Generators(
            sampler=self._generator("sampler", secret=dp),
            noise=self._generator("noise", secret=dp, device=self.device),
        )
        # The network, batches and noise live on self.device (train_epochs moves batches).
        self.network = build_network(self.spec.model).to(
            self.device,
            memory_format=(
                torch.channels_last_3d if self.placement.channels_last else torch.preserve_format
            ),
        )
        unmatched = unmatched_trainable_patterns(self.network, training.trainable)
        if unmatched:
            raise SiteRefusal(
                f"site {self.site} refuses job {self.spec.name}: training.trainable {unmatched} "
                "match no parameter of the network (`fedseg spec check` lists them)"
            )
        # Frozen parameters keep the global model's values: no gradient, no DP noise.
        self.trainable_scalars = freeze_untrainable(self.network, training.trainable)
        optimizer = make_optimizer(
            training, [p for p in self.network.parameters() if p.requires_grad]
        )
        self.dp_settings: DPSettings | None = None
        self.private: PrivateTraining | None = None
        if dp:
            if self.state.released_patients is None:
                # Published once per job (re-drawing would be a second release), noised with
                # the DP noise generator; its cost opens the job's accountant history.
                self.state.released_patients = release_patient_count(
                    len(self.train_patients),
                    noise_std=self.spec.privacy.count_noise_std,
                    generator=self.generators.noise,
                )
            self.dp_settings = resolve_dp_settings(
                self.spec.privacy,
                released_patients=self.state.released_patients,
                batch_size=training.batch_size,
                local_epochs=training.local_epochs,
                rounds=training.rounds,
            )
            # Recorded before any check: a refusal below quotes numbers derived from the
            # released count, so the count counts as released from here on.
            if not self.state.history:
                self._record_count_release()
            self._check_state_against_ledger()
            self._check_whole_job(self.dp_settings)
            self.private = PrivateTraining(self.dp_settings, noise_generator=self.generators.noise)
            self.model, self.optimizer, self.loader = self.private.make_private(
                module=self.network,
                optimizer=optimizer,
                data_loader=dp_loader(
                    self.dataset, self.dp_settings, generator=self.generators.sampler
                ),
            )
            self.private.restore_history(self.state.history)
        else:
            loader = torch.utils.data.DataLoader(
                self.dataset,
                batch_size=min(training.batch_size, len(self.dataset)),
                shuffle=True,
                generator=self.generators.sampler,
            )
            self.model, self.optimizer, self.loader = self.network, optimizer, loader
        if self.state.rounds_done:
            self._restore_rng(self.state.rng_states)
            if self.state.optimizer is not None:
                self.optimizer.load_state_dict(self.state.optimizer)
        self.loss_fn = make_loss()

    def _open_ledger(self) -> EpsilonLedger:
        """The site's ledger, verified: a damaged ledger stops training until an admin acts."""
        path = self.config.ledger or self.state_dir.parent / "epsilon_ledger.jsonl"
        key = self.config.signing_key or self.state_dir.parent / "site_key.pem"
        if not key.exists():
            existing = [p for p in (path, path.with_name(path.name + ".head")) if p.exists()]
            if existing:
                # A new key would make the old ledger unverifiable, and a fresh ledger would
                # look like a site that never spent anything.
                raise SiteRefusal(
                    f"site {self.site} refuses to train: its ledger signing key {key} is missing "
                    f"but its epsilon ledger exists ({existing[0]}); restore the key from the "
                    "site's backup (never create a new one for an existing ledger); if it is "
                    "lost, keep the ledger as the record of what was spent and treat the "
                    "dataset's budget as used up"
                )
            key.parent.mkdir(parents=True, exist_ok=True)
            generate_site_key(key)
            log.warning("created the site's ledger signing key %s (keep it private)", key)
        ledger = EpsilonLedger.open(path=path, key_path=key)
        problems = ledger.verify()
        if problems:
            raise SiteRefusal(
                f"site {self.site} refuses to train: its epsilon ledger {path} failed "
                f"verification ({len(problems)} problem(s), e.g. {problems[0]}); an admin must "
                "resolve it: run `fedseg site ledger` on the site to see every problem"
            )
        return ledger

    def _check_whole_job(self, settings: DPSettings) -> None:
        """Before the first round: the whole job's privacy against this site's policy (noise,
        epsilon, delta), then its epsilon and delta reserved against the site's budget, in one
        step with every other job's (two jobs starting at once cannot both overspend)."""
        policy = self.config.policy
        problems = []
        if settings.noise_multiplier < policy.min_noise_multiplier:
            problems.append(
                f"the job's noise multiplier at this site would be "
                f"{settings.noise_multiplier:.3f}, below this site's minimum of "
                f"{policy.min_noise_multiplier:g}"
            )
        whole = epsilon_spent(
            settings.job_history(self.spec.training.rounds),
            accountant=settings.accountant,
            delta=settings.delta,
        )
        limit = policy.max_epsilon_per_job
        if limit is not None and whole > limit * (1 + 1e-9):
            problems.append(
                f"the whole job would spend epsilon {whole:.3f} at this site, above this site's "
                f"max_epsilon_per_job ({limit:g})"
            )
        delta_budget = policy.max_delta or default_max_delta(len(self.train_patients))
        if settings.delta > delta_budget:
            # The default cap is a function of the exact count: never quote it.
            cap = (
                f"this site's max_delta ({policy.max_delta:g})"
                if policy.max_delta
                else ("this site's default delta cap, 1 / N^1.1 for its N training patients")
            )
            problems.append(f"privacy.delta is {settings.delta:g}, above {cap}")
        if not problems:
            reason = self.ledger.reserve(
                job=self.job_id,
                epsilon=whole,
                delta=settings.delta,
                epsilon_budget=policy.total_epsilon_budget,
                delta_budget=delta_budget,
            )
            if reason:
                problems.append(reason)
        if problems:
            raise SiteRefusal(
                f"site {self.site} refuses job {self.spec.name}: " + "; ".join(problems)
            )

    def _record_count_release(self) -> None:
        """The released count is sent with every answer of the job, refused rounds too: record
        its mechanism now, as the job's first ledger entry and accountant history, and save it,
        so a restart never draws a second count."""
        settings = self.dp_settings
        self.state.history = [settings.count_release]
        self.ledger.append(
            job=self.job_id,
            round=0,
            steps=1,
            sample_rate=1.0,
            noise_multiplier=settings.count_noise_std,
            accountant=settings.accountant,
            epsilon_after=epsilon_spent(
                self.state.history, accountant=settings.accountant, delta=settings.delta
            ),
            delta=settings.delta,
        )
        self.state.save(self._state_path)

    def _check_state_against_ledger(self) -> None:
        """A restarted site continues from its saved state only if the ledger agrees with it: the
        state's epsilon is the last one the ledger recorded for this job (a stale or swapped
        ``dp_state.pt`` would under-count what was spent)."""
        if not self.state.history:
            return
        recorded = self.ledger.spent_by_job().get(self.job_id)
        saved = epsilon_spent(
            self.state.history, accountant=self.dp_settings.accountant, delta=self.dp_settings.delta
        )
        if recorded is None or abs(recorded - saved) > 1e-9 * max(1.0, recorded):
            raise SiteRefusal(
                f"site {self.site} refuses to continue job {self.spec.name}: its saved DP state "
                f"({self._state_path}) says epsilon {saved:.4f} after {self.state.rounds_done} "
                f"round(s), the site's ledger says "
                + ("nothing for this job" if recorded is None else f"{recorded:.4f}")
                + "; the state file was replaced or the ledger restored from an older copy: "
                "an admin must find out which (`fedseg site ledger`)"
            )

    def _restore_rng(self, states: dict) -> None:
        self.dataset.draws = [int(count) for count in states["crop_draws"].tolist()]
        if "noise" in states:  # simulation only, see _rng_snapshot
            self.generators.sampler.set_state(states["sampler"])
            self.generators.noise.set_state(states["noise"])

    def _rng_snapshot(self) -> dict:
        snapshot = {
            "crop_seed": self.dataset.seed,
            "crop_draws": torch.tensor(self.dataset.draws, dtype=torch.int64),
            "spec": self._fingerprint,
        }
        if self.simulation:
            # Only a simulation keeps the DP randomness, for reproducible restarts. A deployed
            # site never writes it anywhere: whoever read it could subtract the noise.
            snapshot["sampler"] = self.generators.sampler.get_state()
            snapshot["noise"] = self.generators.noise.get_state()
        return snapshot

    # -- tasks -----------------------------------------------------------------------------------

    def _load_weights(self, weights: dict[str, np.ndarray]) -> None:
        self.network.load_state_dict(numpy_to_state(weights))

    def validate(self, weights: dict[str, np.ndarray], *, subgroups: bool = False) -> dict:
        """Dice and HD95 (mm) of ``weights`` on this site's held-out patients, as task metadata.

        With ``subgroups``, also the subgroup cells (``keys.SUBGROUPS``); cells smaller than the
        job's ``evaluation.min_subgroup_size`` are dropped here and never sent.
        """
        return self._validation(weights, subgroups=subgroups).to_meta()

    def validate_task(self, weights: dict[str, np.ndarray], owner: str | None) -> dict:
        """The answer to a ``validate`` task for ``owner``'s model (``keys.GLOBAL_MODEL`` or a
        site's local model), as sent: the validation, the owner and this job's epsilon so far.

        Subgroups only for the global model: another site's local model (cross-site
        evaluation) gets site-level metrics only.
        """
        meta = self._validation(weights, subgroups=owner == keys.GLOBAL_MODEL)
        return meta.updated(model_owner=owner, epsilon=self.epsilon()).to_meta()

    def _validation(self, weights: dict[str, np.ndarray], *, subgroups: bool) -> SiteResultMeta:
        self._load_weights(weights)
        evaluations = evaluate_patients(
            OnDevice(self.network),  # volumes stay on the CPU; windows go to the device
            self.val_patients,
            roi_size=self.spec.model.roi_size,
            spacing_mm=self.spec.data.target_spacing_mm,
        )
        meta = summarize(evaluations)
        if subgroups:
            cells = subgroup_cells(
                evaluations, self._groups, min_cell_size=self.spec.evaluation.min_subgroup_size
            )
            meta = meta.updated(subgroups=cells)
        return meta

    def _budget_left(self) -> float | None:
        """The site's total budget minus every job's spend so far; None without a budget."""
        budget = self.config.policy.total_epsilon_budget
        if budget is None or self.ledger is None:
            return None
        try:
            return budget - self.ledger.total_spent()  # total_spent verifies the ledger first
        except LedgerTampered:
            return None  # the round is refused for that reason; no number can be trusted

    def epsilon(self) -> float | None:
        return self.private.epsilon() if self.private else None

    def _refusal(self) -> str | None:
        """Why the next round would break the privacy limits, or None if it may run."""
        if self.dp_settings is None:
            return None
        ledger_problems = self.ledger.verify()
        if ledger_problems:
            return (
                f"site {self.site} refused the round: its epsilon ledger failed verification "
                f"({ledger_problems[0]}); an admin must resolve it (`fedseg site ledger`)"
            )
        limits = {
            "the job's target_epsilon": self.spec.privacy.target_epsilon,
            "this site's max_epsilon_per_job": self.config.policy.max_epsilon_per_job,
        }
        after = projected_epsilon(
            self.state.history, self.dp_settings, self.dp_settings.steps_per_round
        )
        for name, limit in limits.items():
            if limit is not None and after > limit * (1 + 1e-9):
                return (
                    f"site {self.site} refused the round: epsilon would reach {after:.3f}, "
                    f"above {name} ({limit:g})"
                )
        budget = self.config.policy.total_epsilon_budget
        if budget is not None:
            spent = self.ledger.spent_by_job()
            reserved = self.ledger.reservations()
            jobs = (set(spent) | set(reserved)) - {self.job_id}
            others = sum(
                max(spent.get(j, 0.0), reserved.get(j, {}).get("epsilon", 0.0)) for j in jobs
            )
            if others + after > budget * (1 + 1e-9):
                return (
                    f"site {self.site} refused the round: the dataset's epsilon would reach "
                    f"{others + after:.3f} ({others:.3f} spent or reserved by other jobs + "
                    f"{after:.3f} by this one), above this site's total_epsilon_budget "
                    f"({budget:g})"
                )
        return None

    def train_round(self, weights: dict[str, np.ndarray], round_index: int) -> tuple[dict, dict]:
        """Validate the received global model, train locally, and return (weights, metadata);
        the metadata as sent (``SiteResultMeta.to_meta``)."""
        started = time.perf_counter()
        meta = self._validation(weights, subgroups=False)
        # With DP the aggregation weight is the released (noised) count: the exact one is
        # never sent. Without DP the site publishes its exact count (docs/privacy.md).
        patients = len(self.train_patients)
        if self.dp_settings is not None:
            patients = self.dp_settings.released_patients
        meta = meta.updated(
            num_patients=patients,
            delta=None,
            # Other sites may evaluate this update (cross-site) only if it is a DP release or
            # the site's policy does not require DP; the server never forwards it otherwise.
            local_model_shareable=self.spec.privacy.enabled or not self.config.policy.dp_required,
        )
        if self.dp_settings is not None:
            meta = self._with_accounting(meta)
        reason = self._refusal()
        if reason:
            log.warning(reason)
            meta = meta.updated(
                refused=reason,
                epsilon=self.epsilon(),
                num_steps=0,
                budget_left=self._budget_left(),
            )
            return {}, meta.to_meta()

        self._load_weights(weights)
        stats = train_epochs(
            self.model,
            self.optimizer,
            self.loader,
            epochs=self.spec.training.local_epochs,
            loss_fn=self.loss_fn,
            lr_per_epoch=round_learning_rates(self.spec.training, round_index),
        )
        # The local optimizer's state carries over to the next round, as when one process kept
        # its optimizer: restarting Adam every round makes its first, bias-corrected steps
        # lr-sized in every weight, and the sites drift apart (on the demo data FedAvg fell below
        # local-only; docs/researcher.md). Saved below, since the simulator may restart us.
        self.state.optimizer = self.optimizer.state_dict()

        if self.private is not None:
            self.state.history = self.private.history
            # The ledger first: a crash before the state save re-runs the round and records it
            # twice, which over-counts (safe) rather than under-counts.
            self.ledger.append(
                job=self.job_id,
                round=round_index,
                steps=stats.steps,
                sample_rate=self.dp_settings.sample_rate,
                noise_multiplier=self.dp_settings.noise_multiplier,
                accountant=self.dp_settings.accountant,
                epsilon_after=self.private.epsilon(),
                delta=self.dp_settings.delta,
            )
        self.state.rounds_done = round_index + 1
        self.state.rng_states = self._rng_snapshot()
        self.state.save(self._state_path)

        meta = meta.updated(
            num_steps=stats.steps, epsilon=self.epsilon(), budget_left=self._budget_left()
        )
        if self.ledger is not None:
            # The ledger's head travels with each round, so the server's history shows a
            # ledger that was rolled back (its count falls, or an older hash returns).
            count, last_hash = self.ledger.head()
            meta = meta.updated(ledger_entries=count, ledger_head=last_hash[:16])
        if self.dp_settings is None:
            # Computed on the training patients without noise (the loss), or telling how many
            # patients each step held (the time): sent only when the job is not DP.
            meta = meta.updated(
                train_loss=None if math.isnan(stats.mean_loss) else stats.mean_loss,
                elapsed_s=round(time.perf_counter() - started, 3),
            )
        return state_to_numpy(self.network.state_dict()), meta.to_meta()

    def _with_accounting(self, meta: SiteResultMeta) -> SiteResultMeta:
        """``meta`` with what an auditor needs to recompute this site's epsilon with any
        accountant: every mechanism of the job so far as (noise multiplier, sample rate,
        steps), and delta."""
        settings = self.dp_settings
        return meta.updated(
            delta=settings.delta,
            noise_multiplier=settings.noise_multiplier,
            sample_rate=settings.sample_rate,
            count_noise_std=settings.count_noise_std,
            accountant=settings.accountant,
        )
