"""A site's epsilon ledger: every DP training round's privacy spend, append-only and tamper-evident.

Entries are hash-chained and signed with the site's Ed25519 key; a signed head file records how
many entries there are, so removing the last ones is caught too. The ledger spans jobs and restarts.

Files, side by side (``ledger.jsonl`` stands for whatever ``path`` is):

``ledger.jsonl``
    One entry per line, each line the canonical JSON of a `LedgerEntry` (all twelve fields,
    sorted keys, no whitespace, ASCII only), readable by a human.
``ledger.jsonl.head``
    One line of canonical JSON: ``{"count": N, "last_entry_hash": "<hex>", "schema":
    "fedseg.epsilon-ledger-head/1", "signature": "<base64>"}``, the signature being over the
    canonical JSON of the other three fields. ``count`` is 0 and ``last_entry_hash`` is "0"*64
    before the first entry.
``ledger.jsonl.lock``
    Empty; `append` holds an exclusive ``flock`` on it so two jobs at one site never lose an entry.

What `EpsilonLedger.verify` detects, as long as the attacker cannot read the site's private key:
an edited field (hash mismatch), a line not in canonical form (hand edits, duplicate keys), a
removed entry anywhere (chain break, or the head's count), reordered entries (chain break), entries
or a head signed with another key, a malformed line (reported, never a crash), a missing head
next to a ledger, and a head whose entries are missing. One mismatch is accepted on purpose (with
a logged warning): a head exactly one entry behind a ledger whose earlier entries match it, which
is what a crash between the two writes of an append leaves; that extra entry is signed and chained,
so it can only add spend. What verification cannot detect, by construction:

* **Rollback.** Replacing both files with an older, consistent pair of themselves (e.g. from a
  backup) hides every round recorded since. Deleting both files is the extreme case and looks
  like a fresh site. Nothing stored only on this machine can tell; catching it needs the count
  or last hash kept elsewhere (e.g. reported to the server each round).
* **A thief of the private key.** Whoever can read the key file can re-sign anything. Verifying
  with a public key pinned out of band (pass only ``public_key``, as an auditor would) catches a
  key *swap*, not a key *theft*.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_type_hints

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from rich.markup import escape
from rich.table import Table

from jobs.atomic_files import atomic_write
from jobs.spec import Accountant

__all__ = [
    "EpsilonLedger",
    "LedgerEntry",
    "LedgerTampered",
    "generate_site_key",
    "ledger_table",
]

logger = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
HEAD_SCHEMA = "fedseg.epsilon-ledger-head/1"

_ADMIN_ADVICE = (
    "This site refuses to train until an admin resolves it. Keep both files as evidence (do not "
    "delete them: a missing ledger looks like a fresh site with no privacy spent), find out who "
    "changed them, and restore the ledger and its .head together from a backup made after the "
    "latest training round; if there is none, treat the dataset's privacy budget as used up."
)


@dataclass(frozen=True)
class LedgerEntry:
    """One DP training round of one job at this site, as written to the ledger.

    Carries only accounting numbers and a job name: never patient data.
    """

    job: str
    """Job name or id (use the FLARE job id: a name reused for a new run cannot be recorded)."""
    round: int
    """0-based round index within the job."""
    steps: int
    """DP optimizer steps taken in that round."""
    sample_rate: float
    """Poisson sampling probability per step, in (0, 1]."""
    noise_multiplier: float
    """Gaussian noise std as a multiple of max_grad_norm, > 0."""
    accountant: str
    """``"rdp"`` or ``"prv"`` (a `jobs.spec.Accountant` value)."""
    epsilon_after: float
    """The job's cumulative epsilon after this round, as its accountant computed it."""
    delta: float
    """The delta that epsilon is stated at, in (0, 1)."""
    recorded_at: str
    """ISO-8601 UTC timestamp of the append."""
    previous_hash: str
    """The previous entry's ``entry_hash`` (hex sha256); "0"*64 for the first entry."""
    entry_hash: str
    """Hex sha256 of the canonical JSON of every other field except ``signature``."""
    signature: str
    """Base64 Ed25519 signature of ``entry_hash`` (its ASCII hex) by the site key."""


_FIELD_TYPES: dict[str, type] = get_type_hints(LedgerEntry)
_HASHED_FIELDS = tuple(
    f.name for f in fields(LedgerEntry) if f.name not in ("entry_hash", "signature")
)
_HEAD_FIELDS = ("count", "last_entry_hash", "schema", "signature")


class LedgerTampered(Exception):
    """The ledger or its head failed verification; ``problems`` lists every problem found."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = list(problems)
        listed = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(
            f"epsilon ledger {path} failed verification ({len(self.problems)} problem(s)):\n"
            f"{listed}\n{_ADMIN_ADVICE}"
        )


@dataclass(frozen=True)
class _Head:
    count: int
    last_entry_hash: str


@dataclass(frozen=True)
class _Reading:
    """One consistent read of both files; ``entries`` is trustworthy only without ``problems``."""

    raw: bytes
    entries: list[LedgerEntry]
    problems: list[str]
    has_head: bool


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _canonical(document: dict[str, Any]) -> bytes:
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _entry_hash(record: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical({name: record[name] for name in _HASHED_FIELDS})).hexdigest()


def _head_payload(count: int, last_entry_hash: str) -> dict[str, Any]:
    return {"count": count, "last_entry_hash": last_entry_hash, "schema": HEAD_SCHEMA}


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _is_hex64(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _has_type(value: Any, kind: type) -> bool:
    # bool is an int in Python but never a valid round, step count or number here.
    return isinstance(value, kind) and not isinstance(value, bool)


def _where(index: int, record: Any) -> str:
    """How a problem names an entry: index, line, and job/round when those are readable."""
    if isinstance(record, dict):
        job, round_ = record.get("job"), record.get("round")
        if isinstance(job, str) and _has_type(round_, int):
            return f"entry {index} (line {index + 1}, job {job!r}, round {round_})"
    return f"entry {index} (line {index + 1}, job and round unreadable)"


def _count(n: int) -> str:
    return "1 entry" if n == 1 else f"{n} entries"


def _span(first: int, last: int) -> str:
    return f"entry {first}" if first == last else f"entries {first}-{last}"


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``, durably: a power cut leaves the old or the new file."""
    atomic_write(path, data, durable=True)


class EpsilonLedger:
    """A site's epsilon ledger at ``path`` (JSON lines), with its signed head at ``path.head``.

    ``private_key`` signs new entries; pass None (with the site's ``public_key``) to verify and
    read only, as an auditor would. ``clock`` returns the timezone-aware time stamped on each
    append (inject a fake one in tests). Every read verifies both files first; see the module
    docstring for what verification can and cannot detect.
    """

    def __init__(
        self,
        *,
        path: Path,
        private_key: Ed25519PrivateKey | None,
        public_key: Ed25519PublicKey,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        if private_key is not None and private_key.public_key() != public_key:
            raise ValueError(
                f"epsilon ledger {path}: private_key does not belong to public_key "
                "(pass the site key's own public key, e.g. via EpsilonLedger.open)"
            )
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.name + ".head")
        self.reservations_path = self.path.with_name(self.path.name + ".reserved")
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._private_key = private_key
        self._public_key = public_key
        self._clock = clock

    @classmethod
    def open(
        cls, *, path: Path, key_path: Path, clock: Callable[[], datetime] = _utc_now
    ) -> EpsilonLedger:
        """The ledger at ``path``, signing with the unencrypted PEM Ed25519 key at ``key_path``."""
        key_path = Path(key_path)
        try:
            pem = key_path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"site key {key_path} not found: create it once with generate_site_key "
                "(and never replace it: the ledger is verified with it)"
            ) from None
        if key_path.stat().st_mode & 0o077:
            logger.warning(
                "site key %s is readable by other users; anyone who can read it can forge the "
                "epsilon ledger (chmod 600 %s)",
                key_path,
                key_path,
            )
        try:
            private_key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f"site key {key_path}: not an unencrypted PEM private key ({exc}); "
                "create one with generate_site_key"
            ) from None
        if not isinstance(private_key, Ed25519PrivateKey):
            raise ValueError(
                f"site key {key_path}: expected an Ed25519 key, found "
                f"{type(private_key).__name__}; create one with generate_site_key"
            )
        return cls(
            path=path, private_key=private_key, public_key=private_key.public_key(), clock=clock
        )

    # --- reading -----------------------------------------------------------------------------

    def entries(self) -> list[LedgerEntry]:
        """Every entry, oldest first, after verifying; raises `LedgerTampered` on any problem."""
        with self._lock(exclusive=False):
            reading = self._read()
        if reading.problems:
            raise LedgerTampered(self.path, reading.problems)
        return reading.entries

    def verify(self) -> list[str]:
        """Every problem with the ledger and its head, each naming the entry; [] when intact."""
        with self._lock(exclusive=False):
            return self._read().problems

    def spent_by_job(self) -> dict[str, float]:
        """Job -> its epsilon after its latest recorded round, in order of first appearance."""
        return _spent_by_job(self.entries())

    def head(self) -> tuple[int, str]:
        """(entries, hash of the last entry): what a round reports, so that the server's history
        would show the ledger rolled back (the count falls, or the hash of an old count returns)."""
        entries = self.entries()
        return len(entries), entries[-1].entry_hash if entries else GENESIS_HASH

    def reservations(self) -> dict[str, dict[str, float]]:
        """Job -> {"epsilon", "delta"} each job reserved at its start (``reserve``)."""
        with self._lock(exclusive=False):
            return self._read_reservations()

    def reserve(
        self,
        *,
        job: str,
        epsilon: float,
        delta: float,
        epsilon_budget: float | None,
        delta_budget: float | None,
    ) -> str | None:
        """Reserve a whole job's projected ``epsilon`` and ``delta`` before it trains, against
        every other job's larger of spent and reserved, in one step under the ledger's lock:
        two jobs starting at once cannot both fit in a budget that holds only one.

        Returns the reason the job does not fit (nothing reserved), or None (reserved). A job
        that reserved before (a restarted site) keeps its reservation. A job that ends early
        keeps counting at what it reserved: safe, and visible in ``fedseg site ledger``.
        """
        with self._lock(exclusive=True):
            reading = self._read()
            if reading.problems:
                raise LedgerTampered(self.path, reading.problems)
            reserved = self._read_reservations()
            if job in reserved:
                return None
            spent = _spent_by_job(reading.entries)
            deltas = {entry.job: entry.delta for entry in reading.entries}
            jobs = (set(spent) | set(reserved)) - {job}
            others_epsilon = sum(
                max(spent.get(j, 0.0), reserved.get(j, {}).get("epsilon", 0.0)) for j in jobs
            )
            others_delta = sum(
                max(deltas.get(j, 0.0), reserved.get(j, {}).get("delta", 0.0)) for j in jobs
            )
            if epsilon_budget is not None and others_epsilon + epsilon > epsilon_budget * (
                1 + 1e-9
            ):
                return (
                    f"the dataset's epsilon would reach {others_epsilon + epsilon:.3f} "
                    f"({others_epsilon:.3f} spent or reserved by {len(jobs)} other job(s) + "
                    f"{epsilon:.3f} for this whole job), above this site's "
                    f"total_epsilon_budget ({epsilon_budget:g})"
                )
            if delta_budget is not None and others_delta + delta > delta_budget * (1 + 1e-9):
                # The budget may be derived from the exact patient count: never quoted.
                return (
                    f"the dataset's delta would reach {others_delta + delta:.3g} "
                    f"({others_delta:.3g} of other jobs + {delta:g}), above this site's delta cap"
                )
            reserved[job] = {"epsilon": float(epsilon), "delta": float(delta)}
            _write_atomic(self.reservations_path, _canonical(reserved) + b"\n")
        return None

    def _read_reservations(self) -> dict[str, dict[str, float]]:
        try:
            raw = self.reservations_path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(raw)
        except ValueError:
            raise LedgerTampered(
                self.reservations_path,
                [f"{self.reservations_path.name}: not valid JSON; it was edited or corrupted"],
            ) from None
        return data if isinstance(data, dict) else {}

    def total_spent(self) -> float:
        """Total epsilon spent on this site's data: the sum of each job's final epsilon.

        Jobs compose by basic (sequential) composition: their epsilons add, and so do their
        deltas (the sum holds at the sum of the jobs' deltas). It is an upper bound; composing
        all jobs' steps in one accountant would usually give a smaller number, but the sum needs
        no assumption about how different accountants' guarantees combine.
        """
        return sum(self.spent_by_job().values())

    # --- writing -----------------------------------------------------------------------------

    def append(
        self,
        *,
        job: str,
        round: int,
        steps: int,
        sample_rate: float,
        noise_multiplier: float,
        accountant: str,
        epsilon_after: float,
        delta: float,
    ) -> LedgerEntry:
        """Record one finished DP round and return the signed entry.

        Raises `LedgerTampered` (and writes nothing) when verification finds any problem, and
        ``ValueError`` for an invalid value or an epsilon lower than the job's previous one (a
        job name reused for a new run would otherwise hide the earlier run's spend).
        """
        if self._private_key is None:
            raise ValueError(
                f"epsilon ledger {self.path} was opened read-only (no private key); open it with "
                "EpsilonLedger.open(path=..., key_path=<site key>) to append"
            )
        values = _validated(
            job=job,
            round=round,
            steps=steps,
            sample_rate=sample_rate,
            noise_multiplier=noise_multiplier,
            accountant=accountant,
            epsilon_after=epsilon_after,
            delta=delta,
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock(exclusive=True):
            now = self._clock()  # inside the lock, so timestamps follow the ledger's order
            if now.tzinfo is None:
                raise ValueError(
                    "EpsilonLedger clock: expected a timezone-aware datetime, got naive"
                )
            reading = self._read()
            if reading.problems:
                raise LedgerTampered(self.path, reading.problems)
            previous = _spent_by_job(reading.entries).get(job)
            if previous is not None and values["epsilon_after"] < previous:
                raise ValueError(
                    f"epsilon ledger append: epsilon_after for job {job!r}: expected >= "
                    f"{previous} (its last recorded epsilon), got {values['epsilon_after']}; "
                    "a job's epsilon never decreases, so this is a new run under an old name: "
                    "record each run under its own job id"
                )
            record = {
                **values,
                "recorded_at": now.astimezone(UTC).isoformat(),
                "previous_hash": (
                    reading.entries[-1].entry_hash if reading.entries else GENESIS_HASH
                ),
            }
            record["entry_hash"] = _entry_hash(record)
            record["signature"] = self._sign(record["entry_hash"].encode("ascii"))
            entry = LedgerEntry(**record)
            count = len(reading.entries)
            if not reading.has_head:
                # A fresh site: write an empty head first, so a crash between the two writes
                # below leaves the head one entry behind (recoverable), never a lone ledger.
                self._write_head(0, GENESIS_HASH)
            _write_atomic(self.path, reading.raw + _canonical(asdict(entry)) + b"\n")
            self._write_head(count + 1, entry.entry_hash)
        logger.info(
            "epsilon ledger: job %s round %d recorded, epsilon %.4g", job, round, epsilon_after
        )
        return entry

    # --- internals ---------------------------------------------------------------------------

    def _sign(self, message: bytes) -> str:
        assert self._private_key is not None
        return base64.b64encode(self._private_key.sign(message)).decode("ascii")

    def _signature_ok(self, signature: str, message: bytes) -> bool:
        try:
            self._public_key.verify(base64.b64decode(signature, validate=True), message)
        except (InvalidSignature, binascii.Error, ValueError):
            return False
        return True

    def _write_head(self, count: int, last_entry_hash: str) -> None:
        payload = _head_payload(count, last_entry_hash)
        document = {**payload, "signature": self._sign(_canonical(payload))}
        _write_atomic(self.head_path, _canonical(document) + b"\n")

    @contextmanager
    def _lock(self, *, exclusive: bool) -> Iterator[None]:
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            if exclusive:
                raise
            fd = (
                None  # a read-only folder: nobody can be appending, so there is nothing to wait for
            )
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            if fd is not None:
                os.close(fd)  # closing releases the lock

    def _read(self) -> _Reading:
        problems: list[str] = []
        head, has_head = self._read_head(problems)
        try:
            raw = self.path.read_bytes()
            has_ledger = True
        except FileNotFoundError:
            raw, has_ledger = b"", False

        lines = raw.split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        else:
            problems.append(
                f"{_where(len(lines) - 1, None)}: the file does not end with a newline; the last "
                "line was cut short or edited"
            )

        entries: list[LedgerEntry] = []
        hashes: list[str | None] = []  # each line's stored entry_hash; None when unreadable
        labels: list[str] = []
        previous: str | None = GENESIS_HASH
        for index, line in enumerate(lines):
            record, where, line_problems = self._check_line(index, line)
            problems.extend(line_problems)
            labels.append(where)
            if record is None:
                hashes.append(None)
                previous = None  # the next entry's link cannot be checked; one report suffices
                continue
            if previous is not None and record["previous_hash"] != previous:
                problems.append(
                    f"{where}: previous_hash does not match "
                    + (
                        f"the entry_hash of entry {index - 1}: an entry between them was "
                        "removed, or entries were reordered"
                        if index
                        else "the start of the ledger ('0'*64): entries before it were removed, "
                        "or entries were reordered"
                    )
                )
            previous = record["entry_hash"]
            hashes.append(previous)
            entries.append(LedgerEntry(**record))

        if not has_head:
            if has_ledger:
                last = f"; the last entry is {labels[-1]}" if labels else ""
                problems.append(
                    f"head file {self.head_path.name} is missing next to a ledger of "
                    f"{len(lines)} entries{last}: without it, entries removed from the end "
                    "cannot be ruled out"
                )
        elif head is not None:
            problems.extend(self._check_head(head, hashes, labels))
        return _Reading(raw=raw, entries=entries, problems=problems, has_head=has_head)

    def _check_line(self, index: int, line: bytes) -> tuple[dict[str, Any] | None, str, list[str]]:
        """(record if well-formed else None, how to name it, its problems)."""
        try:
            record = json.loads(line, parse_constant=_reject_constant)
        except ValueError as exc:
            where = _where(index, None)
            return (
                None,
                where,
                [f"{where}: not valid JSON ({exc}); the line was edited or corrupted"],
            )
        where = _where(index, record)
        if not isinstance(record, dict):
            return None, where, [f"{where}: expected a JSON object, found {type(record).__name__}"]
        problems = []
        missing = sorted(_FIELD_TYPES.keys() - record.keys())
        unexpected = sorted(record.keys() - _FIELD_TYPES.keys())
        if missing:
            problems.append(f"{where}: missing field(s) {', '.join(missing)}")
        if unexpected:
            problems.append(
                f"{where}: unexpected field(s) {', '.join(unexpected)}; an entry carries only "
                "the fields of LedgerEntry"
            )
        for name, kind in _FIELD_TYPES.items():
            if name in record and not _has_type(record[name], kind):
                problems.append(
                    f"{where}: {name}: expected {kind.__name__}, "
                    f"found {type(record[name]).__name__}"
                )
        for name in ("previous_hash", "entry_hash"):
            if isinstance(record.get(name), str) and not _is_hex64(record[name]):
                problems.append(f"{where}: {name}: expected 64 lowercase hex digits")
        if problems:
            return None, where, problems

        if _canonical(record) != line:
            problems.append(
                f"{where}: the line is not in canonical form (spacing, key order, escaping or "
                "number format changed, or a key repeated): it was edited by hand"
            )
        if _entry_hash(record) != record["entry_hash"]:
            problems.append(
                f"{where}: entry_hash does not match the entry's fields: a field was edited "
                "after the entry was written"
            )
        if not self._signature_ok(record["signature"], record["entry_hash"].encode("ascii")):
            problems.append(
                f"{where}: signature does not verify with the site's public key: the entry was "
                "forged or re-signed with another key"
            )
        return record, where, problems

    def _read_head(self, problems: list[str]) -> tuple[_Head | None, bool]:
        """(the head if present and valid, whether the head file exists); adds its problems."""
        name = self.head_path.name
        try:
            raw = self.head_path.read_bytes()
        except FileNotFoundError:
            return None, False
        try:
            document = json.loads(raw, parse_constant=_reject_constant)
        except ValueError as exc:
            problems.append(f"head file {name}: not valid JSON ({exc}); it was edited or corrupted")
            return None, True
        if (
            not isinstance(document, dict)
            or set(document) != set(_HEAD_FIELDS)
            or document["schema"] != HEAD_SCHEMA
            or not _has_type(document["count"], int)
            or document["count"] < 0
            or not isinstance(document["last_entry_hash"], str)
            or not _is_hex64(document["last_entry_hash"])
            or not isinstance(document["signature"], str)
        ):
            problems.append(
                f"head file {name}: expected {{count, last_entry_hash, schema: {HEAD_SCHEMA!r}, "
                f"signature}}, found {raw[:200]!r}; it was edited or corrupted"
            )
            return None, True
        payload = _head_payload(document["count"], document["last_entry_hash"])
        if not self._signature_ok(document["signature"], _canonical(payload)):
            problems.append(
                f"head file {name}: signature does not verify with the site's public key: it "
                "was forged or re-signed with another key"
            )
            return None, True
        return _Head(count=document["count"], last_entry_hash=document["last_entry_hash"]), True

    def _check_head(self, head: _Head, hashes: list[str | None], labels: list[str]) -> list[str]:
        count, found = head.count, len(hashes)
        recorded = f"the head file records {count} entries but the ledger has {found}"
        if count == found:
            if found and hashes[-1] is not None and hashes[-1] != head.last_entry_hash:
                return [
                    f"{labels[-1]}: its entry_hash is not the one the head file recorded for the "
                    "last entry: the last entry was replaced, or entries were reordered"
                ]
            return []
        if count == found - 1 and head.last_entry_hash == (
            hashes[count - 1] if count else GENESIS_HASH
        ):
            # Both files are written atomically but not together: a crash between the ledger
            # write and the head write leaves exactly this. The extra entry is signed and
            # chained, so it can only add spend, never hide it; the next append rewrites the head.
            logger.warning(
                "epsilon ledger %s: %s (an append was interrupted); %s is kept",
                self.path,
                recorded,
                labels[-1],
            )
            return []
        if count > found:
            if found and hashes[-1] == head.last_entry_hash:
                removed = count - found
                verb = "was" if removed == 1 else "were"
                return [
                    f"{labels[-1]}: {recorded}; the last entry is still there, so "
                    f"{_count(removed)} before it {verb} removed"
                ]
            ends = (
                f"it now ends at {labels[-1]}" if labels else "the ledger file is missing or empty"
            )
            return [
                f"{_span(found, count - 1)} missing: {recorded} ({ends}); entries were removed "
                "from the end"
            ]
        return [
            f"{labels[count]}: {recorded}; the head and ledger do not match (entries added "
            "without the site key's head update, or the head was replaced by an older one)"
        ]


def _spent_by_job(entries: list[LedgerEntry]) -> dict[str, float]:
    spent: dict[str, float] = {}
    for entry in entries:
        spent[entry.job] = entry.epsilon_after
    return spent


def _validated(**values: Any) -> dict[str, Any]:
    """The append arguments checked and normalised (floats as float, accountant as its value)."""

    def fail(name: str, expected: str) -> ValueError:
        return ValueError(
            f"epsilon ledger append: {name}: expected {expected}, got {values[name]!r}"
        )

    def number(name: str, ok: Callable[[float], bool], expected: str) -> float:
        value = values[name]
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise fail(name, expected)
        if not math.isfinite(value) or not ok(float(value)):
            raise fail(name, expected)
        return float(value)

    def count(name: str) -> int:
        value = values[name]
        if not _has_type(value, int) or value < 0:
            raise fail(name, "an integer >= 0")
        return value

    if not isinstance(values["job"], str) or not values["job"].strip():
        raise fail("job", "a non-empty job name or id")
    try:
        accountant = Accountant(values["accountant"]).value
    except ValueError:
        raise fail("accountant", " or ".join(repr(a.value) for a in Accountant)) from None
    return {
        "job": values["job"],
        "round": count("round"),
        "steps": count("steps"),
        "sample_rate": number("sample_rate", lambda q: 0 < q <= 1, "a number in (0, 1]"),
        "noise_multiplier": number("noise_multiplier", lambda s: s > 0, "a number > 0"),
        "accountant": accountant,
        "epsilon_after": number("epsilon_after", lambda e: e >= 0, "a finite number >= 0"),
        "delta": number("delta", lambda d: 0 < d < 1, "a number in (0, 1)"),
    }


def generate_site_key(path: Path) -> None:
    """Write a new Ed25519 private key to ``path`` as unencrypted PKCS#8 PEM, mode 0600.

    Refuses (``FileExistsError``) when ``path`` exists: the ledger is verified with that key, so
    replacing it would make the site's existing ledger unverifiable. Its only protection is the
    file mode; keep it off shared folders and out of backups that others can read.
    """
    path = Path(path)
    pem = Ed25519PrivateKey.generate().private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL makes "exists?" and "create" one step: no overwrite even under a race.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise FileExistsError(
            f"site key {path} already exists; refusing to overwrite it: the epsilon ledger is "
            "verified with it. Use the existing key, or move it away deliberately first"
        ) from None
    try:
        os.fchmod(fd, 0o600)  # the umask may have taken bits away from the mode above
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def ledger_table(ledger: EpsilonLedger, *, budget: float | None) -> Table:
    """One row per entry, with a caption of epsilon used and left of ``budget`` (None: no budget).

    Raises `LedgerTampered` when the ledger fails verification: a table of unverified numbers
    would look trustworthy.
    """
    if budget is not None and not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"ledger_table: budget: expected a number > 0 or None, got {budget!r}")
    entries = ledger.entries()
    spent = _spent_by_job(entries)
    total = sum(spent.values())
    table = Table(title=f"Epsilon ledger ({escape(ledger.path.name)})", header_style="bold")
    for name in ("#", "Job", "Round", "Steps", "Sample rate", "Noise", "Accountant"):
        table.add_column(name, justify="left" if name in ("Job", "Accountant") else "right")
    for name in ("ε after", "δ", "Recorded (UTC)", "Hash"):
        table.add_column(name, justify="right" if name in ("ε after", "δ") else "left")
    for index, entry in enumerate(entries):
        table.add_row(
            str(index),
            escape(entry.job),
            str(entry.round),
            str(entry.steps),
            f"{entry.sample_rate:.4g}",
            f"{entry.noise_multiplier:.4g}",
            entry.accountant,
            f"{entry.epsilon_after:.3f}",
            f"{entry.delta:.1e}",
            entry.recorded_at,
            entry.entry_hash[:12],
        )
    spent_line = (
        f"ε spent: {total:.3f} over {len(spent)} job(s) (sum of each job's final ε: an upper bound)"
    )
    if budget is None:
        table.caption = f"{spent_line}; no budget set"
    elif total <= budget:
        table.caption = (
            f"{spent_line}; budget {budget:.3f}: used {total / budget:.1%}, "
            f"left {budget - total:.3f}"
        )
    else:
        table.caption = (
            f"{spent_line}; budget {budget:.3f}: used {total / budget:.1%}, left 0.000 "
            f"(over by {total - budget:.3f})"
        )
    return table
