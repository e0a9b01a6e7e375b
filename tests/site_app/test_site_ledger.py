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
        policy=policy or PrivacyPolicy(),
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


def test_the_budget_spans_jobs_and_refuses_exactly_the_round_that_would_pass_it(
    tiny_federation, tmp_path
):
    first = _rounds(_job(tiny_federation, tmp_path, "job-a"), 2)
    one_round, two_rounds = first[0][keys.EPSILON], first[1][keys.EPSILON]
    # Room for one more round of another job, not two.
    budget = two_rounds + (one_round + two_rounds) / 2
    second = _job(tiny_federation, tmp_path, "job-b", PrivacyPolicy(total_epsilon_budget=budget))
    metas = _rounds(second, 2)
    assert keys.REFUSED not in metas[0]
    assert "total_epsilon_budget" in metas[1][keys.REFUSED]
    ledger = _ledger(tmp_path)
    assert ledger.total_spent() == pytest.approx(two_rounds + one_round)
    assert ledger.total_spent() <= budget  # never spent past the budget, not even one step
    assert metas[0][keys.BUDGET_LEFT] == pytest.approx(budget - two_rounds - one_round)
    assert metas[1][keys.BUDGET_LEFT] == pytest.approx(budget - ledger.total_spent())


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
