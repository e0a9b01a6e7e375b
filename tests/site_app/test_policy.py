"""A site's privacy policy: which jobs it refuses, and that it refuses before reading data."""

import pytest

from jobs.model import initial_weights
from site_app.local_job import LocalJob
from site_app.policy import PrivacyPolicy, SiteRefusal, job_policy_problems
from site_app.site_config import SiteConfig, SiteConfigError, load_site_config
from tests.conftest import tiny_spec


@pytest.mark.parametrize(
    ("spec", "policy", "expected"),
    [
        (tiny_spec(privacy={"enabled": False}), PrivacyPolicy(), "requires DP"),
        (
            tiny_spec(privacy={"noise_multiplier": 0.5}),
            PrivacyPolicy(min_noise_multiplier=0.8),
            "noise_multiplier is 0.5, below this site's minimum of 0.8",
        ),
        (
            tiny_spec(privacy={"noise_multiplier": None, "target_epsilon": 20}),
            PrivacyPolicy(max_epsilon_per_job=8),
            "target_epsilon is 20, above this site's max_epsilon_per_job of 8",
        ),
        (
            tiny_spec(privacy={"accountant": "prv"}),
            PrivacyPolicy(allowed_accountants=("rdp",)),
            "accountant is prv; this site accepts: rdp",
        ),
        (tiny_spec(privacy={"delta": 1e-3}), PrivacyPolicy(max_delta=1e-5), "max_delta"),
    ],
    ids=["dp-off", "low-noise", "epsilon-above-max", "accountant", "delta"],
)
def test_jobs_that_break_the_policy_are_refused_with_the_reason(spec, policy, expected):
    problems = job_policy_problems(spec, policy)
    assert any(expected in problem for problem in problems), problems


def test_a_compliant_job_passes():
    spec = tiny_spec(training={"seed": None}, privacy={"noise_multiplier": 1.0})
    assert job_policy_problems(spec, PrivacyPolicy(min_noise_multiplier=0.8)) == []


def test_the_site_refuses_before_touching_any_data(tmp_path):
    """The data folder does not even exist: a refusal, not a data error, proves the order."""
    config = SiteConfig(data_dir=tmp_path / "no-such-folder")  # DP required by default
    with pytest.raises(SiteRefusal, match="requires DP"):
        LocalJob(
            spec=tiny_spec(privacy={"enabled": False}),
            site="site-1",
            config=config,
            state_dir=tmp_path / "state",
            simulation=True,
        )
    assert not (tmp_path / "state").exists()


def test_target_epsilon_noise_below_the_site_minimum_is_refused(tiny_federation, tmp_path):
    spec = tiny_spec(privacy={"noise_multiplier": None, "target_epsilon": 50.0})
    config = SiteConfig(
        data_dir=tiny_federation / "site-1",
        cache_dir=tmp_path / "cache",
        policy=PrivacyPolicy.for_simulated_data(min_noise_multiplier=5.0),
    )
    with pytest.raises(SiteRefusal, match="below this site's minimum of 5"):
        LocalJob(spec=spec, site="site-1", config=config, state_dir=tmp_path, simulation=True)


def test_delta_defaults_to_at_most_one_over_the_patients_to_the_1_1(tiny_federation, tmp_path):
    config = SiteConfig(
        data_dir=tiny_federation / "site-1",
        cache_dir=tmp_path / "cache",
        policy=PrivacyPolicy.for_simulated_data(max_delta=None),
    )
    with pytest.raises(SiteRefusal, match=r"1 / N\^1\.1"):
        LocalJob(
            spec=tiny_spec(privacy={"delta": 0.9}),
            site="site-1",
            config=config,
            state_dir=tmp_path / "state",
            simulation=True,
        )
    job = LocalJob(
        spec=tiny_spec(), site="site-1", config=config, state_dir=tmp_path / "ok", simulation=True
    )
    job.train_round(initial_weights(job.spec.model, 0), 0)


def test_a_site_without_a_policy_gets_the_template_s_safe_defaults():
    import yaml

    from provisioning.provision import template_text

    template = yaml.safe_load(template_text())
    builder = next(b for b in template["builders"] if b["path"].endswith("FedsegSiteBuilder"))
    defaults = PrivacyPolicy()
    for field, value in builder["args"]["policy"].items():
        assert getattr(defaults, field) == value, field
    assert defaults.max_delta is None  # 1 / N^1.1 of the site's own N, checked at the site


def test_policy_in_the_site_config_file_is_validated(tmp_path):
    path = tmp_path / "fedseg_site.yaml"
    path.write_text("data_dir: dicom\npolicy:\n  max_epsilon_per_job: 8\n  min_noise: 1\n")
    with pytest.raises(SiteConfigError, match=r"policy\.min_noise"):
        load_site_config(path)
    path.write_text("data_dir: dicom\npolicy:\n  max_epsilon_per_job: 8\n")
    config = load_site_config(path)
    assert config.policy.max_epsilon_per_job == 8 and config.policy.dp_required
    assert config.data_dir == (tmp_path / "dicom").resolve()
