"""The epsilon ledger: survives restarts, sums spend across jobs, and catches every kind of edit."""

import base64
import hashlib
import json
import multiprocessing
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console

from fedseg.ledger_cli import ledger_table
from site_app.ledger import EpsilonLedger, LedgerTampered, generate_site_key
from site_app.ledger_format import LedgerEntry

# (job, round, epsilon_after): job-a is entries 0-2, job-b entries 3-4.
ROUNDS = [
    ("job-a", 0, 0.9),
    ("job-a", 1, 1.4),
    ("job-a", 2, 1.8),
    ("job-b", 0, 0.7),
    ("job-b", 1, 1.1),
]


class FakeClock:
    """One minute later on every call, from 2025-01-01 00:00 UTC."""

    def __init__(self) -> None:
        self.now = datetime(2025, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(minutes=1)
        return self.now


def _record(ledger: EpsilonLedger, job: str, round_: int, epsilon: float) -> LedgerEntry:
    return ledger.append(
        job=job,
        round=round_,
        steps=20,
        sample_rate=0.25,
        noise_multiplier=1.1,
        accountant="rdp",
        epsilon_after=epsilon,
        delta=1e-5,
    )


@pytest.fixture
def key_path(tmp_path) -> Path:
    path = tmp_path / "keys" / "site.key"
    generate_site_key(path)
    return path


@pytest.fixture
def ledger_path(tmp_path) -> Path:
    return tmp_path / "ledger" / "epsilon.jsonl"


@pytest.fixture
def filled(ledger_path, key_path) -> list[LedgerEntry]:
    """The ledger at ledger_path holding ROUNDS; returns the entries append returned."""
    ledger = EpsilonLedger.open(path=ledger_path, key_path=key_path, clock=FakeClock())
    return [_record(ledger, job, round_, epsilon) for job, round_, epsilon in ROUNDS]


def _head_path(ledger_path: Path) -> Path:
    return ledger_path.with_name(ledger_path.name + ".head")


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="ascii").splitlines()


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="ascii")


def _public_key(key_path: Path):
    return serialization.load_pem_private_key(key_path.read_bytes(), password=None).public_key()


def _canonical(document: dict) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode("ascii")


# --- behaviour when intact ---------------------------------------------------------------------


def test_entries_survive_a_restart_and_sum_across_jobs(ledger_path, key_path, filled):
    reopened = EpsilonLedger.open(path=ledger_path, key_path=key_path)

    assert reopened.verify() == []
    assert reopened.entries() == filled
    assert [(e.job, e.round, e.epsilon_after) for e in filled] == ROUNDS
    assert filled[0].recorded_at == "2025-01-01T00:01:00+00:00"
    assert filled[0].previous_hash == "0" * 64
    assert [e.previous_hash for e in filled[1:]] == [e.entry_hash for e in filled[:-1]]
    assert reopened.spent_by_job() == {"job-a": 1.8, "job-b": 1.1}
    assert reopened.total_spent() == pytest.approx(2.9)


def test_ledger_is_one_readable_json_line_per_entry(ledger_path, filled):
    records = [json.loads(line) for line in _lines(ledger_path)]

    assert len(records) == len(ROUNDS)
    assert records[3]["job"] == "job-b" and records[3]["epsilon_after"] == 0.7
    head = json.loads(_head_path(ledger_path).read_text())
    assert (head["count"], head["last_entry_hash"]) == (5, filled[-1].entry_hash)


def test_fresh_site_has_an_empty_ledger(ledger_path, key_path):
    ledger = EpsilonLedger.open(path=ledger_path, key_path=key_path)

    assert ledger.verify() == []
    assert ledger.entries() == []
    assert ledger.total_spent() == 0


def test_appending_continues_after_a_restart(ledger_path, key_path, filled):
    reopened = EpsilonLedger.open(path=ledger_path, key_path=key_path, clock=FakeClock())
    entry = _record(reopened, "job-c", 0, 0.5)

    assert entry.previous_hash == filled[-1].entry_hash
    assert reopened.verify() == []
    assert reopened.spent_by_job() == {"job-a": 1.8, "job-b": 1.1, "job-c": 0.5}


def test_budget_table_shows_every_entry_and_what_is_left(ledger_path, key_path, filled):
    ledger = EpsilonLedger.open(path=ledger_path, key_path=key_path)
    console = Console(record=True, width=250)
    console.print(ledger_table(ledger, budget=10.0))
    text = console.export_text()

    assert text.count("job-a") == 3 and text.count("job-b") == 2
    assert "1.800" in text and "2025-01-01T00:05:00+00:00" in text
    assert "ε spent: 2.900 over 2 job(s)" in text
    assert "budget 10.000: used 29.0%, left 7.100" in text


def test_budget_table_says_when_the_budget_is_exceeded(ledger_path, key_path, filled):
    ledger = EpsilonLedger.open(path=ledger_path, key_path=key_path)
    console = Console(record=True, width=250)
    console.print(ledger_table(ledger, budget=2.0))

    assert "left 0.000 (over by 0.900)" in console.export_text()


def test_an_interrupted_append_is_not_taken_for_tampering(ledger_path, key_path, filled):
    # A crash between the ledger write and the head write leaves the head one entry behind.
    head = _head_path(ledger_path)
    old_head = head.read_bytes()
    ledger = EpsilonLedger.open(path=ledger_path, key_path=key_path, clock=FakeClock())
    _record(ledger, "job-b", 2, 1.3)
    head.write_bytes(old_head)

    assert ledger.verify() == []
    _record(ledger, "job-b", 3, 1.5)
    assert ledger.verify() == []
    assert json.loads(head.read_text())["count"] == len(ROUNDS) + 2


# --- tampering ---------------------------------------------------------------------------------


def _lower_epsilon(ledger_path: Path) -> None:
    lines = _lines(ledger_path)
    record = json.loads(lines[2])
    record["epsilon_after"] = 0.1
    lines[2] = _canonical(record).decode()
    _write_lines(ledger_path, lines)


def _delete_middle(ledger_path: Path) -> None:
    lines = _lines(ledger_path)
    del lines[2]
    _write_lines(ledger_path, lines)


def _delete_last(ledger_path: Path) -> None:
    _write_lines(ledger_path, _lines(ledger_path)[:-1])


def _swap_two(ledger_path: Path) -> None:
    lines = _lines(ledger_path)
    lines[1], lines[2] = lines[2], lines[1]
    _write_lines(ledger_path, lines)


def _forge(ledger_path: Path, forger: Ed25519PrivateKey) -> None:
    """Rewrite everything consistently (lower entry 1, rehash, rechain, re-sign, new head)."""
    previous = "0" * 64
    lines = []
    for index, line in enumerate(_lines(ledger_path)):
        record = json.loads(line)
        if index == 1:
            record["epsilon_after"] = 0.2
        record["previous_hash"] = previous
        hashed = {k: v for k, v in record.items() if k not in ("entry_hash", "signature")}
        record["entry_hash"] = previous = hashlib.sha256(_canonical(hashed)).hexdigest()
        signature = forger.sign(record["entry_hash"].encode("ascii"))
        record["signature"] = base64.b64encode(signature).decode()
        lines.append(_canonical(record).decode())
    _write_lines(ledger_path, lines)
    payload = {"count": len(lines), "last_entry_hash": previous}
    payload["schema"] = json.loads(_head_path(ledger_path).read_text())["schema"]
    head = {**payload, "signature": base64.b64encode(forger.sign(_canonical(payload))).decode()}
    _head_path(ledger_path).write_bytes(_canonical(head) + b"\n")


def _resign_with_another_key(ledger_path: Path) -> None:
    _forge(ledger_path, Ed25519PrivateKey.generate())


def _corrupt_line(ledger_path: Path) -> None:
    lines = _lines(ledger_path)
    lines[3] = lines[3][:40]
    _write_lines(ledger_path, lines)


def _delete_head(ledger_path: Path) -> None:
    _head_path(ledger_path).unlink()


def _delete_ledger(ledger_path: Path) -> None:
    ledger_path.unlink()


TAMPERING = [
    # (how, what a problem must say: the entry it names, and why)
    (_lower_epsilon, "entry 2 (line 3, job 'job-a', round 2)", "entry_hash does not match"),
    (_delete_middle, "entry 2 (line 3, job 'job-b', round 0)", "previous_hash does not match"),
    (_delete_last, "entry 4 missing", "removed from the end"),
    (_swap_two, "entry 1 (line 2, job 'job-a', round 2)", "previous_hash does not match"),
    (_resign_with_another_key, "entry 0 (line 1, job 'job-a', round 0)", "signature does not"),
    (_corrupt_line, "entry 3 (line 4, job and round unreadable)", "not valid JSON"),
    (_delete_head, "entry 4 (line 5, job 'job-b', round 1)", "head file"),
    (_delete_ledger, "entries 0-4 missing", "ledger file is missing"),
]


@pytest.mark.parametrize(
    ("tamper", "names", "why"), TAMPERING, ids=[t[0].__name__.strip("_") for t in TAMPERING]
)
def test_tampering_is_detected_and_blocks_reading_and_appending(
    ledger_path, key_path, filled, tamper, names, why
):
    tamper(ledger_path)
    ledger = EpsilonLedger.open(path=ledger_path, key_path=key_path, clock=FakeClock())
    before = {p: p.read_bytes() for p in (ledger_path, _head_path(ledger_path)) if p.exists()}

    problems = ledger.verify()
    assert any(names in p and why in p for p in problems), problems
    with pytest.raises(LedgerTampered, match="refuses to train") as raised:
        ledger.entries()
    assert names in str(raised.value) and raised.value.problems == problems
    with pytest.raises(LedgerTampered):
        _record(ledger, "job-b", 2, 1.5)
    with pytest.raises(LedgerTampered):
        ledger.total_spent()
    after = {p: p.read_bytes() for p in (ledger_path, _head_path(ledger_path)) if p.exists()}
    assert after == before  # a refused append writes nothing


def test_verify_reports_every_problem_not_just_the_first(ledger_path, key_path, filled):
    lines = _lines(ledger_path)
    for index in (0, 3):
        record = json.loads(lines[index])
        record["steps"] = 1
        lines[index] = _canonical(record).decode()
    _write_lines(ledger_path, lines)

    problems = EpsilonLedger.open(path=ledger_path, key_path=key_path).verify()
    assert any(p.startswith("entry 0 (line 1, job 'job-a', round 0)") for p in problems)
    assert any(p.startswith("entry 3 (line 4, job 'job-b', round 0)") for p in problems)


def test_an_older_head_put_back_is_detected(ledger_path, key_path, tmp_path):
    ledger = EpsilonLedger.open(path=ledger_path, key_path=key_path, clock=FakeClock())
    for job, round_, epsilon in ROUNDS[:3]:
        _record(ledger, job, round_, epsilon)
    old_head = _head_path(ledger_path).read_bytes()
    for job, round_, epsilon in ROUNDS[3:]:
        _record(ledger, job, round_, epsilon)
    _head_path(ledger_path).write_bytes(old_head)

    problems = ledger.verify()
    assert any(p.startswith("entry 3 (line 4, job 'job-b', round 0)") for p in problems)


def test_a_hand_reformatted_line_is_detected(ledger_path, key_path, filled):
    lines = _lines(ledger_path)
    lines[1] = json.dumps(json.loads(lines[1]), indent=None)  # same values, default spacing
    _write_lines(ledger_path, lines)

    problems = EpsilonLedger.open(path=ledger_path, key_path=key_path).verify()
    assert problems == [
        "entry 1 (line 2, job 'job-a', round 1): the line is not in canonical form (spacing, key "
        "order, escaping or number format changed, or a key repeated): it was edited by hand"
    ]


SCHEMA_EDITS = [
    # (edit of entry 1's record, the problem it must give; the entry names job-a round 1)
    (lambda r: r.pop("steps"), "missing field(s) steps"),
    (lambda r: r.update(patient="x"), "unexpected field(s) patient; an entry carries only"),
    (lambda r: r.update(epsilon_after=2), "epsilon_after: expected float, found int"),
    (lambda r: r.update(steps="20"), "steps: expected int, found str"),
    (lambda r: r.update(previous_hash="ABC"), "previous_hash: expected 64 lowercase hex digits"),
]


@pytest.mark.parametrize(("edit", "message"), SCHEMA_EDITS)
def test_an_entry_off_the_schema_is_named_with_its_field(
    ledger_path, key_path, filled, edit, message
):
    lines = _lines(ledger_path)
    record = json.loads(lines[1])
    edit(record)
    lines[1] = _canonical(record).decode()
    _write_lines(ledger_path, lines)

    problems = EpsilonLedger.open(path=ledger_path, key_path=key_path).verify()
    assert f"entry 1 (line 2, job 'job-a', round 1): {message}" in "\n".join(problems), problems


def test_a_forger_who_also_replaced_the_key_is_caught_only_by_a_pinned_public_key(
    ledger_path, key_path, filled
):
    pinned = _public_key(key_path)
    forger = Ed25519PrivateKey.generate()
    _forge(ledger_path, forger)
    key_path.unlink()
    key_path.write_bytes(
        forger.private_bytes(
            encoding=serialization.Encoding.PEM,
            format=serialization.PrivateFormat.PKCS8,
            encryption_algorithm=serialization.NoEncryption(),
        )
    )

    # With the swapped key file the forgery is self-consistent: a documented limitation.
    assert EpsilonLedger.open(path=ledger_path, key_path=key_path).verify() == []
    auditor = EpsilonLedger(path=ledger_path, private_key=None, public_key=pinned)
    assert len([p for p in auditor.verify() if "signature does not verify" in p]) == 6


# --- appending ---------------------------------------------------------------------------------


BAD_APPENDS = [
    ({"job": ""}, "job: expected a non-empty job name or id"),
    ({"round": -1}, "round: expected an integer >= 0, got -1"),
    ({"steps": 2.5}, "steps: expected an integer >= 0, got 2.5"),
    ({"sample_rate": 1.5}, "sample_rate: expected a number in (0, 1], got 1.5"),
    ({"noise_multiplier": 0.0}, "noise_multiplier: expected a number > 0, got 0.0"),
    ({"accountant": "gdp"}, "accountant: expected 'rdp' or 'prv', got 'gdp'"),
    ({"epsilon_after": float("inf")}, "epsilon_after: expected a finite number >= 0, got inf"),
    ({"delta": 0.0}, "delta: expected a number in (0, 1), got 0.0"),
]


@pytest.mark.parametrize(("override", "message"), BAD_APPENDS)
def test_append_rejects_invalid_values_naming_the_field(ledger_path, key_path, override, message):
    ledger = EpsilonLedger.open(path=ledger_path, key_path=key_path)
    arguments = {
        "job": "job-a",
        "round": 0,
        "steps": 20,
        "sample_rate": 0.25,
        "noise_multiplier": 1.1,
        "accountant": "rdp",
        "epsilon_after": 0.9,
        "delta": 1e-5,
    }
    with pytest.raises(ValueError) as raised:
        ledger.append(**{**arguments, **override})
    assert message in str(raised.value)
    assert not ledger_path.exists()


def _append_in_a_process(ledger_path: Path, key_path: Path, job: str, rounds: int, start) -> None:
    ledger = EpsilonLedger.open(path=ledger_path, key_path=key_path)
    start.wait()
    for round_ in range(rounds):
        _record(ledger, job, round_, 0.1 * (round_ + 1))


def test_appends_from_several_processes_at_once_lose_no_entry(ledger_path, key_path):
    """Four site processes (e.g. two jobs, restarted) append five rounds each to one ledger at
    the same moment: every entry is there once, each job's rounds in order, and the chain and
    head verify (the append holds an exclusive flock on ledger.jsonl.lock)."""
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    jobs, rounds = [f"job-{i}" for i in range(4)], 5
    processes = [
        context.Process(
            target=_append_in_a_process, args=(ledger_path, key_path, job, rounds, start)
        )
        for job in jobs
    ]
    for process in processes:
        process.start()
    start.set()
    for process in processes:
        process.join(120)
    assert [process.exitcode for process in processes] == [0] * len(jobs)

    ledger = EpsilonLedger.open(path=ledger_path, key_path=key_path)
    assert ledger.verify() == []
    entries = ledger.entries()
    assert len(entries) == len(jobs) * rounds == len(_lines(ledger_path))
    for job in jobs:
        assert [e.round for e in entries if e.job == job] == list(range(rounds))
    assert json.loads(_head_path(ledger_path).read_text())["count"] == len(entries)
    times = [datetime.fromisoformat(e.recorded_at) for e in entries]
    assert times == sorted(times)  # stamped inside the lock


def test_append_refuses_an_epsilon_lower_than_the_jobs_last(ledger_path, key_path, filled):
    ledger = EpsilonLedger.open(path=ledger_path, key_path=key_path)
    with pytest.raises(ValueError, match="record each run under its own job id"):
        _record(ledger, "job-a", 0, 0.5)  # "job-a" reused for a new run would hide 1.8
    assert ledger.spent_by_job()["job-a"] == 1.8


def test_a_read_only_ledger_verifies_but_cannot_append(ledger_path, key_path, filled):
    auditor = EpsilonLedger(path=ledger_path, private_key=None, public_key=_public_key(key_path))

    assert auditor.entries() == filled
    with pytest.raises(ValueError, match="read-only"):
        _record(auditor, "job-c", 0, 0.1)


# --- keys and privacy --------------------------------------------------------------------------


def test_site_key_is_private_and_never_overwritten(key_path):
    original = key_path.read_bytes()

    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        generate_site_key(key_path)
    assert key_path.read_bytes() == original


def test_entries_carry_only_accounting_fields_never_patient_data(ledger_path, filled):
    expected = {
        "job",
        "round",
        "steps",
        "sample_rate",
        "noise_multiplier",
        "accountant",
        "epsilon_after",
        "delta",
        "recorded_at",
        "previous_hash",
        "entry_hash",
        "signature",
    }
    assert set(LedgerEntry.model_fields) == expected
    assert all(set(json.loads(line)) == expected for line in _lines(ledger_path))
