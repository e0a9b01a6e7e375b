"""Shared fixtures: one tiny simulated federation (real DICOM), a tiny job spec, and a site job
over it."""

from pathlib import Path

import pytest

from jobs.spec import JobSpec, parse_spec
from simulator.synthetic_data import generate_federation_data

FLARE_PROCESS_MODULES = frozenset(
    {
        "tests/provisioning/test_poc.py",
        "tests/provisioning/test_poc_trust.py",
        "tests/server_app/test_controller_evaluation.py",
        "tests/server_app/test_mlflow_tracking.py",
        "tests/simulator/test_compare.py",
        "tests/simulator/test_federation.py",
        "tests/simulator/test_tracking.py",
        "tests/test_phi.py",
    }
)
"""Test modules that start FLARE processes (the simulator or a POC federation). `make test` runs
two pytest-xdist workers: these modules all go to one of them, one test after another, and the
other worker takes every other module, whole (tests/test_test_layout.py checks this list)."""


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's file scheduling, with FLARE_PROCESS_MODULES as one unit of work.

    Two FLARE runs at once on this 2-core machine failed (POC admin logins timed out while a
    simulator ran), and the session fixtures those modules share (``tiny_run``, the POC
    federation) then start once, not once a worker. xdist's own ``--dist loadgroup`` would say
    this with a mark, but it does not group on pytest 9.2 (pytest-dev/pytest-xdist#1386).
    xdist hands out the largest unit first, so the FLARE unit starts at once.
    """
    from xdist.scheduler import LoadFileScheduling

    class FlareProcessesTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "flare-processes" if module in FLARE_PROCESS_MODULES else module

    return FlareProcessesTogether(config, log)


TINY_SPEC = {
    "name": "tiny",
    "model": {"channels": [4, 8], "strides": [2], "roi_size": [16, 16, 16]},
    "data": {"target_spacing_mm": [10.0, 10.0, 10.0], "val_fraction": 0.34},
    "training": {"rounds": 2, "local_epochs": 1, "batch_size": 2, "lr": 0.003, "seed": 0},
    "privacy": {
        "enabled": True,
        "noise_multiplier": 1.0,
        "count_noise_std": 1.0,  # the released count of a 2-patient site stays near 2
    },
    "federation": {"min_clients": 2},
}


def tiny_spec(**sections) -> JobSpec:
    """TINY_SPEC with whole-section overrides merged in, e.g. tiny_spec(privacy={...})."""
    data = {
        key: dict(value) if isinstance(value, dict) else value for key, value in TINY_SPEC.items()
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return parse_spec(data)


def site_job(
    spec: JobSpec,
    site_dir: Path,
    tmp_path: Path,
    *,
    site: str = "site-1",
    simulation: bool = True,
    **config,
):
    """A real LocalJob over one site folder: the simulated data's policy (``config`` overrides
    SiteConfig fields, the policy included), the decode cache under ``tmp_path / "cache"``,
    state under ``tmp_path / "state"``; ``simulation=False`` runs it as a deployed site."""
    from site_app.local_job import LocalJob
    from site_app.policy import PrivacyPolicy
    from site_app.site_config import SiteConfig

    return LocalJob(
        spec=spec,
        site=site,
        config=SiteConfig(
            data_dir=site_dir,
            cache_dir=tmp_path / "cache",
            **({"policy": PrivacyPolicy.for_simulated_data()} | config),
        ),
        state_dir=tmp_path / "state",
        simulation=simulation,
    )


@pytest.fixture(scope="session")
def tiny_federation(tmp_path_factory) -> Path:
    """2 sites x 3 patients of 32x32 CT (plus each site's deliberately broken inputs)."""
    out = tmp_path_factory.mktemp("federation") / "data"
    generate_federation_data(out_dir=out, sites=2, patients_per_site=3, seed=0, matrix=32)
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_federation, tmp_path_factory):
    """One FLARE simulation of the tiny spec over the tiny federation, shared by every test that
    only reads its results (history, models, TensorBoard files); read it, never change it."""
    from simulator.federation import run_simulation

    out = tmp_path_factory.mktemp("tiny-run")
    return run_simulation(tiny_spec(), data_dir=tiny_federation, out_dir=out)
