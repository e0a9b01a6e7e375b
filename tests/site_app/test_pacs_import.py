"""PACS import over DICOMweb, against a real Orthanc (Debian orthanc + orthanc-dicomweb).

The tests start Orthanc on loopback with its storage in a temporary folder, upload simulated
DICOM through its REST API, import it with `fedseg site import`'s core, and stop the server.
Without Orthanc installed the server tests skip, saying so; nothing stands in for it.
"""

from __future__ import annotations

import datetime
import glob
import ipaddress
import json
import os
import select
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import certifi
import pytest
import requests
from pydicom import dcmread

from fedseg.cli import main
from simulator.synthetic_data import generate_federation_data
from site_app.dicomweb_source import DicomwebSource, StudySelection
from site_app.ingestion import ingest_site
from site_app.pacs_errors import PacsImportError
from site_app.pacs_import import PARTIAL_PREFIX, import_from_dicomweb, journal_path
from site_app.pacs_plan import InstanceRef, plan_fetches

USER = "fedseg-site"
PASSWORD = "orthanc-test-password"
PASSWORD_ENV = "FEDSEG_TEST_PACS_PASSWORD"
INSTALL_HINT = "apt-get install orthanc orthanc-dicomweb"
PLUGIN_GLOBS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so*",
    "/usr/lib/orthanc/libOrthancDicomWeb.so*",
    "/usr/lib/*/orthanc/libOrthancDicomWeb.so*",
)


# --- a real Orthanc on loopback ------------------------------------------------------------------


def _orthanc_binary() -> str:
    found = shutil.which("Orthanc") or next(
        (p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.access(p, os.X_OK)), None
    )
    if found is None:
        pytest.skip(f"Orthanc not installed: {INSTALL_HINT}")
    return found


def _dicomweb_plugin() -> Path:
    for pattern in PLUGIN_GLOBS:
        matches = sorted(glob.glob(pattern))
        if matches:
            return Path(matches[0])
    pytest.skip(f"Orthanc's DICOMweb plugin not installed: {INSTALL_HINT}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class Orthanc:
    root: str  # REST root, e.g. http://127.0.0.1:PORT
    session: requests.Session  # logged in

    @property
    def dicomweb(self) -> str:
        return self.root + "/dicom-web"


@contextmanager
def running_orthanc(work: Path, *, plugin: bool = True) -> Iterator[Orthanc]:
    """Orthanc on a free loopback port, storage under ``work``, basic auth on, no DICOM port,
    the DICOMweb plugin loaded unless ``plugin`` is False. Stopped, and waited for, on exit."""
    binary = _orthanc_binary()
    plugins = [str(_dicomweb_plugin())] if plugin else []
    work.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    config = {
        "Name": "fedseg-test",
        "StorageDirectory": str(work / "storage"),
        "IndexDirectory": str(work / "storage"),
        "HttpPort": port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "DicomServerEnabled": False,
        "HttpThreadsCount": 4,
        "ConcurrentJobs": 1,
        "Plugins": plugins,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    config_path = work / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    server = Orthanc(root=f"http://127.0.0.1:{port}", session=requests.Session())
    server.session.auth = (USER, PASSWORD)
    log_path = work / "orthanc.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [binary, str(config_path)], stdout=log, stderr=subprocess.STDOUT, cwd=work
        )
    try:
        _wait_until_up(server, process, log_path)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        server.session.close()


def _wait_until_up(server: Orthanc, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"Orthanc exited ({process.returncode}):\n{log_path.read_text()[-3000:]}")
        try:
            if server.session.get(server.root + "/system", timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    pytest.fail(f"Orthanc did not answer within 30 s:\n{log_path.read_text()[-3000:]}")


def _upload(server: Orthanc, files: list[Path]) -> dict[str, Path]:
    """POST each file to Orthanc's /instances; the accepted ones by SOPInstanceUID."""
    accepted = {}
    for path in files:
        answer = server.session.post(server.root + "/instances", data=path.read_bytes())
        if answer.ok:
            accepted[str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = path
    return accepted


@dataclass(frozen=True)
class Pacs:
    server: Orthanc
    site_dir: Path  # the simulated site the server was loaded from
    uploaded: dict[str, Path]  # SOPInstanceUID -> original file


@pytest.fixture(scope="module")
def pacs(tmp_path_factory) -> Iterator[Pacs]:
    """One simulated site (2 good patients + the simulator's 2 broken ones, 32x32 CT) in Orthanc."""
    _orthanc_binary()
    _dicomweb_plugin()
    data = tmp_path_factory.mktemp("simulated") / "data"
    generate_federation_data(out_dir=data, sites=1, patients_per_site=2, seed=0, matrix=32)
    site_dir = data / "site-1"
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        uploaded = _upload(server, sorted(p for p in site_dir.rglob("*") if p.is_file()))
        assert len(uploaded) > 150  # the stray non-DICOM and truncated files are refused
        yield Pacs(server=server, site_dir=site_dir, uploaded=uploaded)


@pytest.fixture
def source(pacs, monkeypatch) -> DicomwebSource:
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    return DicomwebSource(url=pacs.server.dicomweb, username=USER, password_env=PASSWORD_ENV)


@pytest.fixture(scope="module")
def full_import(pacs, tmp_path_factory):
    os.environ[PASSWORD_ENV] = PASSWORD
    try:
        source = DicomwebSource(url=pacs.server.dicomweb, username=USER, password_env=PASSWORD_ENV)
        out = tmp_path_factory.mktemp("imported") / "site-1"
        return import_from_dicomweb(source, out), out
    finally:
        del os.environ[PASSWORD_ENV]


def _dicom_files(out: Path) -> dict[str, Path]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in out.rglob("*.dcm")}


# --- a full import -------------------------------------------------------------------------------


def test_full_import_holds_exactly_the_uploaded_instances_byte_for_byte(pacs, full_import):
    summary, out = full_import
    assert summary.complete and summary.studies == 4
    assert summary.fetched == summary.instances == len(pacs.uploaded)
    imported = _dicom_files(out)
    assert set(imported) == set(pacs.uploaded)
    for uid, path in imported.items():
        original = pacs.uploaded[uid]
        assert dcmread(path).PixelData == dcmread(original).PixelData
        assert path.read_bytes() == original.read_bytes()  # as stored: no transcoding
    assert not [p for p in out.rglob("*") if p.is_file() and p.suffix != ".dcm"]


def test_names_on_disk_and_the_journal_carry_no_uids_or_patient_data(pacs, full_import):
    summary, out = full_import
    secrets = set()
    for original in pacs.uploaded.values():
        ds = dcmread(original, stop_before_pixels=True)
        secrets |= {str(ds.PatientName), str(ds.PatientID), str(ds.StudyInstanceUID)}
        secrets |= {str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)}
    secrets.discard("")
    names = [p.relative_to(out).as_posix() for p in out.rglob("*")]
    journal = summary.journal.read_text()
    assert summary.journal == journal_path(out) and summary.journal.parent == out.parent
    assert len(journal.splitlines()) == summary.fetched
    leaks = [s for s in secrets if any(s in name for name in names) or s in journal]
    assert not leaks


@pytest.mark.slow
def test_the_imported_folder_ingests_to_the_same_patients_as_the_original(pacs, full_import):
    _, out = full_import
    original = ingest_site(pacs.site_dir)
    imported = ingest_site(out)
    assert [p.patient_key for p in imported.patients] == [p.patient_key for p in original.patients]
    assert len(imported.patients) == 2
    for mine, theirs in zip(imported.patients, original.patients, strict=True):
        assert mine.volumes == theirs.volumes
    # the broken series the PACS accepted are quarantined for the same reasons
    reasons = {entry.reason for entry in imported.quarantine}
    assert {"missing_slices", "unsupported_modality"} <= reasons


# --- resume --------------------------------------------------------------------------------------


def test_a_rerun_fetches_only_what_the_interrupted_run_left(pacs, source, tmp_path):
    out = tmp_path / "site"
    total = len(pacs.uploaded)
    first = import_from_dicomweb(source, out, limit=50)
    assert (first.fetched, first.remaining, first.already_present) == (50, total - 50, 0)
    assert not first.complete
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.dcm")}
    assert len(before) == 50

    second = import_from_dicomweb(source, out)
    assert (second.already_present, second.fetched, second.remaining) == (50, total - 50, 0)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in before} == before  # untouched
    assert set(_dicom_files(out)) == set(pacs.uploaded)

    third = import_from_dicomweb(source, out)
    assert (third.already_present, third.fetched) == (total, 0)


def test_damaged_missing_and_half_written_files_are_fetched_again(pacs, source, tmp_path):
    out = tmp_path / "site"
    import_from_dicomweb(source, out)
    files = sorted(out.rglob("*.dcm"))
    damaged, deleted = files[3], files[70]
    good = damaged.read_bytes()
    damaged.write_bytes(good[: len(good) // 2])
    deleted.unlink()
    partial = files[5].parent / f"{PARTIAL_PREFIX}killed-mid-write"
    partial.write_bytes(good[:100])

    rerun = import_from_dicomweb(source, out)
    assert (rerun.fetched, rerun.already_present) == (2, len(pacs.uploaded) - 2)
    assert damaged.read_bytes() == good and deleted.is_file() and not partial.exists()


def test_files_without_a_journal_are_verified_instead_of_fetched_again(pacs, source, tmp_path):
    out = tmp_path / "site"
    first = import_from_dicomweb(source, out)
    first.journal.unlink()
    rerun = import_from_dicomweb(source, out)
    assert (rerun.fetched, rerun.already_present) == (0, len(pacs.uploaded))
    assert len(first.journal.read_text().splitlines()) == len(pacs.uploaded)


# --- selection -----------------------------------------------------------------------------------


def test_modality_selects_whole_studies_holding_it(pacs, source, tmp_path):
    summary = import_from_dicomweb(source, tmp_path / "mr", selection=StudySelection(modality="MR"))
    imported = [dcmread(p, stop_before_pixels=True) for p in (tmp_path / "mr").rglob("*.dcm")]
    assert summary.studies == 1 and imported
    assert {str(ds.Modality) for ds in imported} == {"MR"}


def test_study_selects_one_study_with_its_seg(pacs, source, tmp_path):
    seg = next(p for p in pacs.uploaded.values() if p.parent.name == "SEG")
    study_uid = str(dcmread(seg, stop_before_pixels=True).StudyInstanceUID)
    expected = {
        uid
        for uid, path in pacs.uploaded.items()
        if dcmread(path, stop_before_pixels=True).StudyInstanceUID == study_uid
    }
    selection = StudySelection(study_uids=(study_uid,), modality="CT")
    summary = import_from_dicomweb(source, tmp_path / "one", selection=selection)
    assert summary.studies == 1
    imported = _dicom_files(tmp_path / "one")
    assert set(imported) == expected
    assert {str(dcmread(p).Modality) for p in imported.values()} == {"CT", "SEG"}


def test_a_study_the_server_does_not_hold_is_named_by_position(source, tmp_path):
    selection = StudySelection(study_uids=("1.2.3.4", "1.2.3.999"))
    with pytest.raises(PacsImportError, match="--study value number 1: the server lists no such"):
        import_from_dicomweb(source, tmp_path / "none", selection=selection)
    assert not (tmp_path / "none").exists()


# --- errors from a real server -------------------------------------------------------------------


def test_a_closed_port_is_named_with_what_to_check(tmp_path):
    url = f"http://127.0.0.1:{_free_port()}/dicom-web"
    with pytest.raises(PacsImportError, match=f"cannot reach the DICOMweb server at {url}"):
        import_from_dicomweb(DicomwebSource(url=url), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_out_folder_that_cannot_be_written_is_named(source, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(PacsImportError, match=r"--out .*a-file is a file, not a folder"):
        import_from_dicomweb(source, tmp_path / "a-file")
    with pytest.raises(PacsImportError, match=r"cannot read or write .*a-file/site"):
        import_from_dicomweb(source, tmp_path / "a-file" / "site", limit=1)


def test_a_path_without_dicomweb_is_a_404_naming_the_path(pacs, source, tmp_path):
    wrong = DicomwebSource(url=pacs.server.root + "/wado", username=USER, password_env=PASSWORD_ENV)
    with pytest.raises(PacsImportError, match=r"no DICOMweb service \(HTTP 404 for /wado/studies"):
        import_from_dicomweb(wrong, tmp_path / "out")


@pytest.mark.slow
def test_a_server_without_the_dicomweb_plugin_says_to_enable_it(tmp_path, monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    with running_orthanc(tmp_path / "orthanc", plugin=False) as server:
        bare = DicomwebSource(url=server.dicomweb, username=USER, password_env=PASSWORD_ENV)
        with pytest.raises(PacsImportError, match="DICOMweb plugin is installed and enabled"):
            import_from_dicomweb(bare, tmp_path / "out")


@pytest.mark.parametrize(
    ("password", "username", "expected"),
    [
        ("wrong-password", USER, f"refused the login \\(HTTP 401\\).*{PASSWORD_ENV}"),
        (None, None, "requires a login \\(HTTP 401\\).*--username USER and --password-env"),
    ],
)
def test_logins_the_server_refuses_are_401s(
    pacs, tmp_path, monkeypatch, password, username, expected
):
    if password is not None:
        monkeypatch.setenv(PASSWORD_ENV, password)
    source = DicomwebSource(
        url=pacs.server.dicomweb, username=username, password_env=PASSWORD_ENV if username else None
    )
    with pytest.raises(PacsImportError, match=expected):
        import_from_dicomweb(source, tmp_path / "out")


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: (PEM with certificate and key, PEM CA bundle)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedseg test PACS")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "server.pem").write_bytes(cert_pem + key_pem)
    (folder / "ca.pem").write_bytes(cert_pem)
    return folder / "server.pem", folder / "ca.pem"


@contextmanager
def tls_front(target_port: int, certificate: Path) -> Iterator[int]:
    """A TLS-terminating relay on loopback in front of ``target_port``; yields its port.

    Orthanc is usually deployed behind such a proxy (nginx); its own https (civetweb with
    OpenSSL 3, Debian 12's Orthanc 1.10.1) crashes on the first handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)  # closing a socket does not wake a thread blocked in accept()
    stop = threading.Event()

    def relay(client: socket.socket) -> None:
        try:
            with (
                context.wrap_socket(client, server_side=True) as front,
                socket.create_connection(("127.0.0.1", target_port)) as back,
            ):
                for end in (front, back):  # relay each piece at once (no Nagle delays)
                    end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                peer = {front: back, back: front}
                while not stop.is_set():
                    ready = (
                        [front] if front.pending() else select.select([front, back], [], [], 1)[0]
                    )
                    for end in ready:
                        data = end.recv(65536)
                        if not data:
                            return
                        peer[end].sendall(data)
        except OSError:  # ssl.SSLError included: a client that does not trust the certificate
            return

    def accept() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            threading.Thread(target=relay, args=(client,), daemon=True).start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        listener.close()
        acceptor.join(timeout=5)


@pytest.mark.slow
def test_https_needs_the_hospital_ca_and_works_with_it(pacs, tmp_path, monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    # Many machines set this; requests then ignores a session's own CA unless we insist.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())
    server_pem, ca = _self_signed(tmp_path / "tls")
    orthanc_port = int(pacs.server.root.rsplit(":", 1)[1])
    with tls_front(orthanc_port, server_pem) as port:
        url = f"https://127.0.0.1:{port}/dicom-web"
        login = {"username": USER, "password_env": PASSWORD_ENV}
        with pytest.raises(PacsImportError, match=r"certificate is not trusted.*--ca-bundle"):
            import_from_dicomweb(DicomwebSource(url=url, **login), tmp_path / "out")
        seg = next(p for p in pacs.uploaded.values() if p.parent.name == "SEG")
        study_uid = str(dcmread(seg, stop_before_pixels=True).StudyInstanceUID)
        summary = import_from_dicomweb(
            DicomwebSource(url=url, ca_bundle=ca, **login),
            tmp_path / "out",
            selection=StudySelection(study_uids=(study_uid,)),
        )
    assert summary.complete and summary.fetched == summary.instances > 40


# --- the command line ----------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_imports_in_batches_and_says_how_to_continue(pacs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    out = tmp_path / "site"
    argv = ["site", "import", "--dicomweb", pacs.server.dicomweb, "--out", str(out)]
    argv += ["--username", USER, "--password-env", PASSWORD_ENV]
    assert main([*argv, "--max-instances", "10"]) == 0
    said = capsys.readouterr().out
    assert "10 new instance(s)" in said and "run the same command again" in said
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert f"{len(pacs.uploaded) - 10} new instance(s)" in said and "fedseg site check" in said


def test_cli_errors_exit_2_with_the_reason_and_no_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    url = f"http://127.0.0.1:{_free_port()}/dicom-web"
    argv = ["site", "import", "--dicomweb", url, "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot reach the DICOMweb server" in err and "Traceback" not in err
    assert main([*argv, "--username", USER, "--password-env", PASSWORD_ENV]) == 2
    assert f"--password-env {PASSWORD_ENV}: that environment variable is not set" in (
        capsys.readouterr().err
    )


# --- configuration and planning (no server) --------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"url": "ftp://pacs/dicom-web"}, "expected an http:// or https:// URL"),
        ({"url": "https://me:pw@pacs/dicom-web"}, "remove it from the URL and pass --username"),
        ({"url": "https://pacs/dicom-web?x=1"}, "without '\\?' or '#'"),
        ({"url": "https://pacs/dw", "username": "me"}, "--username and --password-env go"),
        (
            {"url": "https://pacs/dw", "username": "me", "password_env": "FEDSEG_UNSET_VAR"},
            "not set",
        ),
        ({"url": "http://pacs/dw", "ca_bundle": Path("ca.pem")}, "https:// URLs only"),
        ({"url": "https://pacs/dw", "ca_bundle": Path("/nonexistent.pem")}, "file not found"),
        ({"url": "https://pacs/dw", "timeout_s": 0}, "--timeout: expected seconds > 0"),
    ],
)
def test_bad_source_settings_are_named(arguments, expected, monkeypatch):
    monkeypatch.delenv("FEDSEG_UNSET_VAR", raising=False)
    with pytest.raises(PacsImportError, match=expected):
        DicomwebSource(**arguments)


def test_basic_auth_over_plain_http_to_another_machine_is_refused_unless_allowed(monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    login = {"username": USER, "password_env": PASSWORD_ENV}
    with pytest.raises(PacsImportError, match=r"password in clear.*--allow-insecure-http"):
        DicomwebSource(url="http://pacs.example.org/dicom-web", **login)
    allowed = DicomwebSource(
        url="http://pacs.example.org/dicom-web", allow_insecure_http=True, **login
    )
    assert allowed.sends_password_in_clear  # still warned about at import time
    for url in ("https://pacs.example.org/dicom-web", "http://127.0.0.1:8042/dicom-web"):
        assert not DicomwebSource(url=url, **login).sends_password_in_clear  # never on the wire
    assert DicomwebSource(url="http://pacs.example.org/dicom-web")  # no password, nothing to leak


def test_cli_refuses_a_password_over_http_and_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    argv = ["site", "import", "--dicomweb", "http://pacs.example.org/dicom-web"]
    argv += ["--out", str(tmp_path / "o"), "--username", USER, "--password-env", PASSWORD_ENV]
    assert main(argv) == 2
    assert "the network to the PACS" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_password_is_neither_shown_nor_compared(monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    source = DicomwebSource(url="https://pacs/dw", username=USER, password_env=PASSWORD_ENV)
    assert PASSWORD not in repr(source)
    assert source == DicomwebSource(url="https://pacs/dw", username=USER, password_env=PASSWORD_ENV)


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        ({"study_uids": ("1.2.3", "1.2.x")}, "--study value number 2 is not a valid DICOM UID"),
        ({"modality": "ct"}, "--modality 'ct': expected an upper-case"),
    ],
)
def test_bad_selections_are_named(selection, expected):
    with pytest.raises(PacsImportError, match=expected):
        StudySelection(**selection)


def test_plan_fetches_whole_series_only_when_none_of_it_is_on_disk():
    refs = [
        InstanceRef("1.1", series, f"{series}.{k}") for series in ("1.2", "1.3") for k in (1, 2)
    ]
    batches = plan_fetches(refs, present={refs[0]})
    assert [(b.series_uid, b.whole_series, len(b.refs)) for b in batches] == [
        ("1.2", False, 1),
        ("1.3", True, 2),
    ]
    assert plan_fetches(refs, present=set(refs)) == []
    path = refs[0].relative_path
    assert path.parts[0].startswith("st-") and path.parts[1].startswith("s-")
    assert path.name.startswith("i-") and "1.2" not in path.as_posix()
