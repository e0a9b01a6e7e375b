"""One real POC federation (provisioned kits, separate FLARE processes on loopback) shared by the
POC test modules, and the helpers they use to submit jobs and wait for them."""

import os
import time
from pathlib import Path

import pytest
import yaml

from jobs.spec import load_spec, parse_spec
from provisioning.poc import PocState, poc_processes, start_poc, stop_poc
from researcher_app.session import job_status
from simulator.synthetic_data import generate_federation_data
from site_app.site_config import SITE_CONFIG_FILE, load_site_config, site_private_dir

POLICY = {
    "dp_required": True,
    "max_epsilon_per_job": 8.0,
    "min_noise_multiplier": 0.5,
    "total_epsilon_budget": 1000.0,
}
TINY = {
    "model": {"channels": [4, 8], "strides": [2], "roi_size": [16, 16, 16]},
    "data": {"target_spacing_mm": [10.0, 10.0, 10.0], "val_fraction": 0.34},
    "training": {"rounds": 2, "local_epochs": 1, "batch_size": 2},
}
CANARY_ENV = "FEDSEG_POC_CANARY"
CANARY = "canary7q3x"
"""An environment variable every POC process has: a hostile job tries to read it out."""


def poc_spec(**sections):
    """jobs/specs/demo.yaml (the default spec) with tiny settings and the given overrides.

    The tiny network is not the shipped pretrained one, so its ``model.init`` and
    ``training.trainable`` go; a ``noise_multiplier`` override replaces the target epsilon.
    """
    data = load_spec("jobs/specs/demo.yaml").to_plain()
    data["model"].pop("init", None)
    data["training"].pop("trainable", None)
    for section, values in {**TINY, **sections}.items():
        data[section] = {**data[section], **values}
    privacy = sections.get("privacy", {})
    if "noise_multiplier" in privacy and "target_epsilon" not in privacy:
        data["privacy"]["target_epsilon"] = None
    return parse_spec(data)


@pytest.fixture(scope="package")
def poc(tmp_path_factory):
    root = tmp_path_factory.mktemp("poc")
    data = root / "data"
    generate_federation_data(out_dir=data, sites=2, patients_per_site=6, seed=0, matrix=32)
    started = time.monotonic()
    before = os.environ.get(CANARY_ENV)
    # Every process started from the kits inherits it, also a site a test restarts.
    os.environ[CANARY_ENV] = CANARY
    state = start_poc(root / "workspace", sites=2, data_dir=data)
    print(f"\nPOC start to all sites connected: {time.monotonic() - started:.1f} s")
    federation = state.federation
    for kit in federation.sites.values():
        path = kit / "local" / SITE_CONFIG_FILE
        config = yaml.safe_load(path.read_text())
        config["policy"] = POLICY
        path.write_text(yaml.safe_dump(config))
    yield root / "workspace", state
    if before is None:
        os.environ.pop(CANARY_ENV, None)
    else:
        os.environ[CANARY_ENV] = before
    stop_poc(root / "workspace")
    assert poc_processes(Path(state.kits_dir)) == [], "POC processes left after stop"


def poc_kit(state: PocState, role: str) -> Path:
    """The admin kit of the first admin with ``role``."""
    federation = state.federation
    return federation.admins[federation.admin_with_role(role)][1]


def site_private(state: PocState, site: str) -> Path:
    """Where ``site`` keeps its cache and quarantine lists (outside its FLARE workspace)."""
    kit = state.federation.sites[site]
    return site_private_dir(load_site_config(kit / "local" / SITE_CONFIG_FILE), kit)


def wait_for_job(kit: Path, job_id: str, timeout_s: float = 420.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = job_status(kit, job_id)
        if status.status.startswith("FINISHED"):
            return status
        time.sleep(3)
    raise AssertionError(f"job {job_id} still {status.status} after {timeout_s} s")
