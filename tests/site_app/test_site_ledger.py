"""The site's epsilon ledger in use: every DP round recorded, budgets across jobs, tampering."""

import pytest

from jobs import keys
from jobs.model import initial_weights
from site_app.ledger import EpsilonLedger
from site_app.local_job import LocalJob
from site_app.policy import PrivacyPolicy, SiteRefusal
from site_app.site_config import SiteConfig
from tests.conftest import tiny_spec


def _job(federation, tmp_path, job_id, policy: PrivacyPolicy | None = None):
    config = SiteConfig(
        data_dir=federation / "site-1",
        cache_dir=tmp_path / "cache",
        ledger=tmp_path / "ledger" / "epsilon.jsonl",
        signing_key=tmp_path / "ledger" / "site_key.pem",
        policy=policy or PrivacyPolicy.for_simulated_data(),
    )
    return LocalJob(
        spec=tiny_spec(),
        site="site-1",
        config=config,
        state_dir=tmp_path / job_id,
        simulation=True,
        job_id=job_id,
    )


def _rounds(job, n):
    weights, metas = initial_weights(job.spec.model, 0), []
    for index in range(n):
        weights, meta = job.train_round(weights, index)
        metas.append(meta)
    return metas


def _ledger(tmp_path):
    folder = tmp_path / "ledger"
    return EpsilonLedger.open(path=folder / "epsilon.jsonl", key_path=folder / "site_key.pem")


def test_every_round_is_recorded_with_what_the_site_reported(tiny_federation, tmp_path):
    job = _job(tiny_federation, tmp_path, "job-a")
    metas = _rounds(job, 2)
    count, *rounds = _ledger(tmp_path).entries()
    # First the job's patient-count release (one Gaussian step at rate 1), then each round.
    assert (count.job, count.round, count.steps, count.sample_rate) == ("job-a", 0, 1, 1.0)
    assert count.noise_multiplier == job.dp_settings.count_noise_std
    assert [(e.job, e.round) for e in rounds] == [("job-a", 0), ("job-a", 1)]
    assert [e.epsilon_after for e in rounds] == [m[keys.EPSILON] for m in metas]
    assert all(e.steps == m[keys.NUM_STEPS] for e, m in zip(rounds, metas, strict=True))
    assert 0 < count.epsilon_after < rounds[0].epsilon_after


def test_the_budget_spans_jobs_and_a_job_that_would_pass_it_never_starts(tiny_federation, tmp_path):
    first = _rounds(_job(tiny_federation, tmp_path, "job-a"), 2)
    whole_job = first[1][keys.EPSILON]  # tiny_spec: 2 rounds
    # Room for one more round of another job, not its two: refused before its first round.
    budget = whole_job * 1.5
    lenient = PrivacyPolicy.for_simulated_data(total_epsilon_budget=budget)
    with pytest.raises(SiteRefusal, match="total_epsilon_budget"):
        _job(tiny_federation, tmp_path, "job-b", lenient)
    ledger = _ledger(tmp_path)
    # job-b trained nothing: it spent only its released patient count, which its refusal
    # (quoting an epsilon derived from that count) already disclosed.
    spent_b = ledger.spent_by_job()["job-b"]
    assert [e.steps for e in ledger.entries() if e.job == "job-b"] == [1]
    assert ledger.total_spent() == pytest.approx(whole_job + spent_b)
    assert spent_b < first[0][keys.EPSILON]
    # With room for both, the second job runs and reports what is left.
    roomy = PrivacyPolicy.for_simulated_data(total_epsilon_budget=whole_job * 3)
    metas = _rounds(_job(tiny_federation, tmp_path, "job-c", roomy), 2)
    assert keys.REFUSED not in metas[1]
    assert metas[1][keys.BUDGET_LEFT] == pytest.approx(whole_job * 3 - ledger.total_spent())
    assert ledger.total_spent() <= whole_job * 3


def _reserve_in_a_process(ledger_dir, job, epsilon, budget, start, results):
    ledger = EpsilonLedger.open(
        path=ledger_dir / "epsilon.jsonl", key_path=ledger_dir / "site_key.pem"
    )
    start.wait()
    reason = ledger.reserve(
        job=job, epsilon=epsilon, delta=1e-5, epsilon_budget=budget, delta_budget=None
    )
    results.put((job, reason))


def test_two_jobs_starting_at_once_cannot_both_take_a_budget_that_holds_one(tmp_path):
    """Each of two processes reserves a job of epsilon 6 against a budget with room for one, at
    once: exactly one gets it, whatever the order (the check and the write are one locked
    step). Three trials, each budget 6 larger for the job the previous trial granted."""
    import multiprocessing

    from site_app.ledger import generate_site_key

    folder = tmp_path / "ledger"
    generate_site_key(folder / "site_key.pem")
    context = multiprocessing.get_context("spawn")
    for trial in range(3):
        start, results = context.Event(), context.Queue()
        jobs = [f"job-{trial}-a", f"job-{trial}-b"]
        processes = [
            context.Process(
                target=_reserve_in_a_process,
                args=(folder, job, 6.0, 10.0 + 6 * trial, start, results),
            )
            for job in jobs
        ]
        for process in processes:
            process.start()
        start.set()
        outcomes = dict(results.get(timeout=60) for _ in jobs)
        for process in processes:
            process.join(60)
        granted = [job for job, reason in outcomes.items() if reason is None]
        assert len(granted) == 1, outcomes
        refused = next(reason for reason in outcomes.values() if reason is not None)
        assert "total_epsilon_budget" in refused
    assert len(_ledger(tmp_path).reservations()) == 3


def test_a_tampered_ledger_stops_training_until_an_admin_resolves_it(tiny_federation, tmp_path):
    job = _job(tiny_federation, tmp_path, "job-a")
    weights, _ = job.train_round(initial_weights(job.spec.model, 0), 0)
    path = tmp_path / "ledger" / "epsilon.jsonl"
    path.write_text(path.read_text().replace('"epsilon_after":', '"epsilon_after":0.0001+', 1))
    _, meta = job.train_round(weights, 1)  # mid-job: the next round is refused
    assert "ledger failed verification" in meta[keys.REFUSED]
    with pytest.raises(SiteRefusal, match="epsilon ledger"):  # and so is any new job
        _job(tiny_federation, tmp_path, "job-b")


def test_the_ledger_is_only_kept_for_dp_jobs(tiny_federation, tmp_path):
    config = SiteConfig(
        data_dir=tiny_federation / "site-1",
        cache_dir=tmp_path / "cache",
        ledger=tmp_path / "ledger" / "epsilon.jsonl",
        policy=PrivacyPolicy(dp_required=False),
    )
    job = LocalJob(
        spec=tiny_spec(privacy={"enabled": False}),
        site="site-1",
        config=config,
        state_dir=tmp_path / "job",
        simulation=True,
    )
    job.train_round(initial_weights(job.spec.model, 0), 0)
    assert not (tmp_path / "ledger" / "epsilon.jsonl").exists()


def test_a_missing_signing_key_with_a_ledger_is_refused_never_recreated(tiny_federation, tmp_path):
    _rounds(_job(tiny_federation, tmp_path, "job-a"), 1)
    key = tmp_path / "ledger" / "site_key.pem"
    key.unlink()
    with pytest.raises(SiteRefusal, match=r"signing key .* is missing but its epsilon ledger"):
        _job(tiny_federation, tmp_path, "job-b")
    assert not key.exists()  # no new key: the old ledger stays verifiable once it is restored


def test_a_saved_state_that_disagrees_with_the_ledger_is_refused(tiny_federation, tmp_path):
    import shutil

    job = _job(tiny_federation, tmp_path, "job-a")
    metas = _rounds(job, 1)
    state = tmp_path / "job-a" / "dp_state.pt"
    shutil.copy(state, tmp_path / "after-round-1.pt")
    job.train_round(initial_weights(job.spec.model, 0), 1)
    shutil.copy(tmp_path / "after-round-1.pt", state)  # an older state: one round undone
    with pytest.raises(SiteRefusal, match=r"saved DP state .* the site.s ledger says"):
        _job(tiny_federation, tmp_path, "job-a")
    assert metas[0][keys.EPSILON] > 0


def test_each_round_reports_the_ledger_head_so_a_rollback_shows(tiny_federation, tmp_path):
    metas = _rounds(_job(tiny_federation, tmp_path, "job-a"), 2)
    # Round 1: the count release and the round; round 2: one more entry.
    assert [m[keys.LEDGER_ENTRIES] for m in metas] == [2, 3]
    entries = _ledger(tmp_path).entries()
    assert metas[-1][keys.LEDGER_HEAD] == entries[-1].entry_hash[:16]
    assert metas[0][keys.LEDGER_HEAD] == entries[1].entry_hash[:16]
