"""A site's whole job without FLARE: training rounds, the privacy limit, restarts from disk."""

import numpy as np
import pytest
import torch

from jobs import keys
from jobs.model import initial_weights
from site_app.policy import PrivacyPolicy, SiteRefusal
from site_app.privacy import epsilon_spent
from tests.conftest import site_job, tiny_spec


def _job(federation, tmp_path, spec=None, simulation=True, **config):
    return site_job(
        spec or tiny_spec(), federation / "site-1", tmp_path, simulation=simulation, **config
    )


def test_a_round_returns_weights_and_the_metadata_the_server_needs(tiny_federation, tmp_path):
    job = _job(tiny_federation, tmp_path)
    start = initial_weights(job.spec.model, 0)
    weights, meta = job.train_round(start, 0)
    assert set(weights) == set(start)
    assert any(not np.array_equal(weights[k], start[k]) for k in start)
    # The weight the site publishes is its DP-noised count, never the exact one.
    assert meta[keys.NUM_PATIENTS] == job.dp_settings.released_patients >= 1
    assert meta[keys.NUM_STEPS] == job.dp_settings.steps_per_round
    assert meta[keys.EPSILON] > 0
    assert keys.REFUSED not in meta
    # Bad files were quarantined with reasons, in the site's private folder (the parent of the
    # job's state when none is given), not in the data folder.
    assert (tmp_path / job.job_id / "quarantine.json").is_file()


def test_epsilon_grows_across_rounds_and_equals_the_accountant(tiny_federation, tmp_path):
    job = _job(tiny_federation, tmp_path)
    weights = initial_weights(job.spec.model, 0)
    epsilons = []
    for round_index in range(3):
        weights, meta = job.train_round(weights, round_index)
        epsilons.append(meta[keys.EPSILON])
    assert epsilons[0] < epsilons[1] < epsilons[2]
    settings = job.dp_settings
    steps = 3 * settings.steps_per_round
    # The job's mechanisms: the released count, then every DP-SGD step.
    expected = epsilon_spent(
        [settings.count_release, (settings.noise_multiplier, settings.sample_rate, steps)],
        accountant="rdp",
        delta=settings.delta,
    )
    assert epsilons[-1] == pytest.approx(expected, rel=1e-12)


def test_a_restarted_site_continues_epsilon_and_randomness(tiny_federation, tmp_path):
    """Two rounds in one process == one round, a restart, and the second round."""
    start = initial_weights(tiny_spec().model, 0)
    straight = _job(tiny_federation, tmp_path / "a")
    w1, _ = straight.train_round(start, 0)
    w2, meta2 = straight.train_round(w1, 1)

    first = _job(tiny_federation, tmp_path / "b")
    v1, _ = first.train_round(start, 0)
    restarted = _job(tiny_federation, tmp_path / "b")  # a new process would rebuild from disk
    # Adam's moments carry over from round to round, through the restart too.
    kept = first.optimizer.state_dict()["state"]
    restored = restarted.optimizer.state_dict()["state"]
    assert kept and restored.keys() == kept.keys()
    assert all(torch.equal(restored[i]["exp_avg_sq"], kept[i]["exp_avg_sq"]) for i in kept)
    v2, meta_restarted = restarted.train_round(v1, 1)

    assert meta_restarted[keys.EPSILON] == meta2[keys.EPSILON]
    assert all(np.array_equal(w2[k], v2[k]) for k in w2)


def test_state_from_another_spec_is_refused(tiny_federation, tmp_path):
    job = _job(tiny_federation, tmp_path)
    job.train_round(initial_weights(job.spec.model, 0), 0)
    other = tiny_spec(training={"lr": 0.01})
    with pytest.raises(RuntimeError, match="different job spec"):
        _job(tiny_federation, tmp_path, spec=other)


def test_a_job_whose_whole_epsilon_passes_the_site_limit_is_refused_before_round_one(
    tiny_federation, tmp_path
):
    probe = _job(tiny_federation, tmp_path / "probe")
    weights, meta = probe.train_round(initial_weights(probe.spec.model, 0), 0)
    one_round = meta[keys.EPSILON]
    _, meta = probe.train_round(weights, 1)
    whole_job = meta[keys.EPSILON]  # tiny_spec: 2 rounds

    # A limit between one round's and the whole job's epsilon: refused at the start (before,
    # a noise_multiplier job ran its first round and was refused in the middle).
    policy = PrivacyPolicy.for_simulated_data(max_epsilon_per_job=(one_round + whole_job) / 2)
    with pytest.raises(
        SiteRefusal, match=r"the whole job would spend epsilon .*max_epsilon_per_job"
    ):
        _job(tiny_federation, tmp_path / "job", policy=policy)
    # Nothing trained: the saved state holds only the released patient count.
    from site_app.privacy import DPState

    refused = DPState.load(tmp_path / "job" / "state" / "dp_state.pt")
    assert refused.rounds_done == 0 and len(refused.history) == 1
    # The whole job fits: it runs both rounds.
    fits = PrivacyPolicy.for_simulated_data(max_epsilon_per_job=whole_job * 1.01)
    job = _job(tiny_federation, tmp_path / "fits", policy=fits)
    weights, meta = job.train_round(initial_weights(job.spec.model, 0), 0)
    _, meta = job.train_round(weights, 1)
    assert keys.REFUSED not in meta and meta[keys.EPSILON] == pytest.approx(whole_job)


def test_without_dp_nothing_is_accounted(tiny_federation, tmp_path):
    job = _job(
        tiny_federation,
        tmp_path,
        spec=tiny_spec(privacy={"enabled": False}),
        policy=PrivacyPolicy.for_simulated_data(),
    )
    _, meta = job.train_round(initial_weights(job.spec.model, 0), 0)
    assert meta[keys.EPSILON] is None
    assert meta[keys.NUM_STEPS] >= 1


def test_a_site_with_no_dicom_says_which_folder(tmp_path):
    empty = tmp_path / "dicom"
    empty.mkdir()
    (empty / "readme.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match=str(empty)):
        site_job(tiny_spec(), empty, tmp_path)


def test_a_deployed_site_never_writes_its_dp_randomness(tiny_federation, tmp_path):
    # Even with training.seed set: outside simulation the seed fixes splits and crops only.
    job = _job(tiny_federation, tmp_path, spec=tiny_spec(), simulation=False)
    job.train_round(initial_weights(job.spec.model, 0), 0)
    saved = torch.load(tmp_path / "state" / "dp_state.pt", weights_only=False)
    assert "noise" not in saved["rng"] and "sampler" not in saved["rng"]
    assert saved["history"]  # the accountant history is kept: epsilon must compose


def test_deployed_noise_differs_between_two_runs_of_the_same_job(tiny_federation, tmp_path):
    results = []
    for run in ("a", "b"):
        seeded = tiny_spec()  # the same spec as in simulation: the seed must not reach the noise
        job = _job(tiny_federation, tmp_path / run, spec=seeded, simulation=False)
        weights, _ = job.train_round(initial_weights(job.spec.model, 0), 0)
        results.append(weights)
    assert any(not np.array_equal(results[0][k], results[1][k]) for k in results[0])
