"""A real FLARE federation on loopback: provisioned kits, separate server and site processes,
jobs submitted through FLARE's Session API, and everything that must be refused.

Slow (a few minutes): one POC is started for the module and stopped at the end, and the test
checks that no process of it is left.
"""

import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

from provisioning.poc import (
    connected_sites,
    poc_processes,
    start_participant,
    stop_participant,
)
from provisioning.provision import provision, template_text
from researcher_app.flare_job import build_job
from researcher_app.session import FederationError, download, job_status, open_session, submit
from server_app.history import read_history
from server_app.report import write_report
from tests.provisioning.conftest import POLICY, site_private
from tests.provisioning.conftest import poc_kit as _kit
from tests.provisioning.conftest import poc_spec as _spec
from tests.provisioning.conftest import wait_for_job as _wait

pytestmark = pytest.mark.slow


def test_the_default_spec_runs_end_to_end_through_the_session_api(poc, tmp_path):
    _, state = poc
    kit = _kit(state, "lead")
    spec = _spec(privacy={"noise_multiplier": 1.2})
    started = time.monotonic()
    job_id = submit(spec, kit)
    status = _wait(kit, job_id)
    print(f"\nPOC job wall time (submit to finished): {time.monotonic() - started:.1f} s")
    assert status.status == "FINISHED:COMPLETED", status
    assert status.rounds_done == 2 and status.rounds_planned == 2
    assert [site.site for site in status.sites] == ["site-1", "site-2"]
    for site in status.sites:
        assert site.refused is None and not site.missing_rounds
        assert 0 < site.epsilon <= POLICY["max_epsilon_per_job"]
        # The site's quarantine list lands in its private folder, outside its FLARE workspace.
        private = site_private(state, site.site)
        assert (private / job_id / "quarantine.json").is_file()
        assert not private.is_relative_to(state.federation.sites[site.site])
    # FLARE's job store is in the server's workspace (its kit), not under /tmp.
    assert (state.federation.server_kit / "jobs-storage" / job_id / "meta").is_file()
    assert not Path("/tmp/nvflare/jobs-storage", job_id).exists()

    out = download(kit, job_id, tmp_path / "results")
    history = read_history(out / "history.json")
    assert history.rounds_completed == 2
    assert (out / "models" / "final_model.pt").is_file()
    assert (out / "models" / "global_model_round_2.pt").is_file()
    report = write_report(history, spec=history.spec, out_dir=out).to_json()
    assert sorted(row["site"] for row in report["per_site"]) == ["site-1", "site-2"]
    # Each site's own epsilon (the sites' released counts, and so their rates, differ).
    by_site = {site.site: site.epsilon for site in status.sites}
    assert {row["site"]: row["epsilon"] for row in report["per_site"]} == pytest.approx(by_site)
    assert (out / "report.md").is_file()


@pytest.mark.parametrize("role", ["member", "org_admin"])
def test_roles_that_may_not_submit_are_refused(poc, role):
    _, state = poc
    with pytest.raises(FederationError, match="refused to accept the job"):
        submit(_spec(privacy={"noise_multiplier": 1.2}), _kit(state, role))


def test_a_job_carrying_custom_code_is_refused(poc, tmp_path):
    _, state = poc
    spec = _spec(privacy={"noise_multiplier": 1.2})
    job = build_job(spec, sites=["site-1", "site-2"])
    job.export_job(str(tmp_path))
    custom = tmp_path / spec.name / "app_site-1" / "custom"
    custom.mkdir(parents=True)
    (custom / "exfiltrate.py").write_text("print('this must never run at a site')\n")
    kit = _kit(state, "lead")
    with open_session(kit) as session:  # fedseg never adds custom code: submit it by hand
        job_id = session.submit_job(str(tmp_path / spec.name))
    status = _wait(kit, job_id)
    # Each site's FLARE refuses to deploy it (authorization.json: byoc none for every role).
    assert status.status == "FINISHED:FAILED_TO_RUN", status
    assert "site-1: NVFLARE_ERROR: BYOC not permitted" in status.errors
    assert not (state.federation.sites["site-1"] / job_id).exists()  # never deployed there


@pytest.mark.parametrize(
    ("privacy", "reason"),
    [
        ({"enabled": False}, "requires DP for every job"),
        (
            {"noise_multiplier": None, "target_epsilon": 20.0},
            "above this site's max_epsilon_per_job of 8",
        ),
        ({"noise_multiplier": 0.3}, "below this site's minimum of 0.5"),
    ],
    ids=["dp-off", "epsilon-above-max", "noise-below-min"],
)
def test_a_job_breaking_site_policy_is_refused_and_the_researcher_sees_why(poc, privacy, reason):
    _, state = poc
    kit = _kit(state, "lead")
    job_id = submit(_spec(privacy=privacy), kit)
    status = _wait(kit, job_id)
    assert [site.site for site in status.sites] == ["site-1", "site-2"]
    for site in status.sites:
        assert site.refused is not None and reason in site.refused, site
        # Refused before touching data: the site never ingested for this job.
        assert not (site_private(state, site.site) / job_id / "quarantine.json").exists()


def _connects_within(federation, site: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if site in connected_sites(federation):
            return True
        time.sleep(2)
    return False


def _log_text(kit: Path) -> str:
    return "\n".join(
        path.read_text(errors="replace")
        for path in (kit / "log.txt", kit / "poc_console.txt")
        if path.is_file()
    )


def test_a_site_from_another_provisioning_cannot_join(poc, tmp_path):
    _, state = poc
    federation = state.federation
    project = yaml.safe_load(template_text())
    server = next(p for p in project["participants"] if p["type"] == "server")
    server["fed_learn_port"] = federation.port  # same address, different root CA
    project["participants"] = [p for p in project["participants"] if p["type"] != "client"] + [
        {"name": "site-9", "type": "client", "org": "intruder"}
    ]
    path = tmp_path / "foreign.yml"
    path.write_text(yaml.safe_dump(project))
    foreign = provision(path, tmp_path / "foreign_kits").sites["site-9"]
    pid = start_participant(foreign)
    try:
        assert not _connects_within(federation, "site-9", 25)
    finally:
        stop_participant(foreign, pid, grace_s=2)
    assert poc_processes(foreign) == []


def test_an_altered_kit_is_refused_and_the_original_joins(poc, tmp_path):
    workspace, state = poc
    federation = state.federation
    # A third site, provisioned later by the same project admin (same root CA).
    project = yaml.safe_load((workspace / "project.yml").read_text())
    project["participants"].append({"name": "site-3", "type": "client", "org": "hospital_c"})
    path = workspace / "project_with_site_3.yml"
    path.write_text(yaml.safe_dump(project))
    kit = provision(path, workspace / "kits").sites["site-3"]
    config = kit / "startup" / "fed_client.json"
    original = config.read_text()
    altered = json.loads(original)
    altered["client"]["ssl_root_cert"] = "rootCA.pem "  # any edit after provisioning
    config.write_text(json.dumps(altered))
    pid = start_participant(kit)
    try:
        assert not _connects_within(federation, "site-3", 20)
        assert "not secure content" in _log_text(kit)
    finally:
        stop_participant(kit, pid, grace_s=2)
    config.write_text(original)  # the kit as provisioned: FLARE accepts it
    pid = start_participant(kit)
    try:
        assert _connects_within(federation, "site-3", 60)
    finally:
        stop_participant(kit, pid, grace_s=10)
    shutil.rmtree(kit / "fedseg", ignore_errors=True)


def test_a_killed_site_is_marked_missing_and_a_restarted_site_rejoins(poc):
    workspace, state = poc
    kit = _kit(state, "lead")
    rounds = 4
    spec = _spec(
        training={"rounds": rounds, "local_epochs": 10},  # a few seconds a round
        privacy={"noise_multiplier": 6.0},  # epsilon 3.5 over 80 steps: within the policy
        federation={"min_clients": 1, "round_timeout_s": 20},
    )
    job_id = submit(spec, kit, sites=["site-1", "site-2"])
    deadline = time.monotonic() + 300
    while (running := job_status(kit, job_id)).rounds_done < 1:
        assert not running.status.startswith("FINISHED"), running
        assert time.monotonic() < deadline, f"round 1 never finished: {running}"
        time.sleep(1)
    site_kit = state.federation.sites["site-2"]
    stop_participant(site_kit, state.pids["site-2"], grace_s=0)  # killed, mid-job
    assert poc_processes(site_kit) == []
    # Site-2 may have answered another round while the status was read. Once it is dead, no
    # round after the one in progress can hold its answer.
    aggregated_at_kill = job_status(kit, job_id).rounds_done
    assert aggregated_at_kill + 1 < rounds, "the job outran the kill; nothing left to observe"
    state.pids["site-2"] = start_participant(site_kit)  # the site restarts
    state.save(workspace)

    status = _wait(kit, job_id)
    # FLARE ends a job whose process died at a site as ABNORMAL; the rounds still completed.
    assert status.status in ("FINISHED:COMPLETED", "FINISHED:ABNORMAL"), status
    history = _history(kit, job_id, workspace, rounds)
    assert history.rounds_completed == rounds
    by_round = {(r.site, r.round): r for r in history.rounds}
    assert all(not by_round[("site-1", k)].missing for k in range(rounds))
    site_2_missing = [k for k in range(rounds) if by_round[("site-2", k)].missing]
    # Answered up to the kill, missing from then on: never lost, never back inside this job.
    first_missing = site_2_missing[0] if site_2_missing else rounds
    assert 1 <= first_missing <= aggregated_at_kill + 1, (aggregated_at_kill, site_2_missing)
    assert site_2_missing == list(range(first_missing, rounds))
    report = write_report(history, spec=history.spec, out_dir=workspace / "fault_report").to_json()
    assert report["missing"] == [{"site": "site-2", "round": k} for k in site_2_missing]

    # The restarted site is back in the federation and takes part in the next job. (FLARE does
    # not redeploy a running job to a restarted site, so it cannot rejoin the same job.)
    assert _connects_within(state.federation, "site-2", 60)
    job_id = submit(_spec(privacy={"noise_multiplier": 2.0}), kit)
    status = _wait(kit, job_id)
    assert status.status == "FINISHED:COMPLETED", status
    site_2 = next(site for site in status.sites if site.site == "site-2")
    assert site_2.last_round == 1 and not site_2.missing_rounds and site_2.refused is None


def _history(kit: Path, job_id: str, workspace: Path, rounds: int):
    out = download(kit, job_id, workspace / "downloads" / job_id)
    for k in range(rounds + 1):
        assert (out / "models" / f"global_model_round_{k}.pt").is_file()  # nothing lost
    return read_history(out / "history.json")
