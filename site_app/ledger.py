"""A site's epsilon ledger: every DP training round's privacy spend, append-only and tamper-evident.

Entries are hash-chained and signed with the site's Ed25519 key; a signed head file records how
many entries there are, so removing the last ones is caught too. The ledger spans jobs and restarts.

Files, side by side (``ledger.jsonl`` stands for whatever ``path`` is):

``ledger.jsonl``
    One entry per line, each line the canonical JSON of a `LedgerEntry` (all twelve fields,
    sorted keys, no whitespace, ASCII only), readable by a human. The records, their schema and
    the checks of one read are ``site_app.ledger_format``'s; ``fedseg site ledger`` shows them
    (``fedseg.ledger_cli``).
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
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from jobs.atomic_files import atomic_write
from site_app.ledger_format import (
    GENESIS_HASH,
    LedgerEntry,
    Reading,
    append_values,
    canonical,
    entry_hash,
    head_payload,
    read_ledger,
)

__all__ = [
    "EpsilonLedger",
    "LedgerTampered",
    "generate_site_key",
    "spent_by_job",
]

logger = logging.getLogger(__name__)

_ADMIN_ADVICE = (
    "This site refuses to train until an admin resolves it. Keep both files as evidence (do not "
    "delete them: a missing ledger looks like a fresh site with no privacy spent), find out who "
    "changed them, and restore the ledger and its .head together from a backup made after the "
    "latest training round; if there is none, treat the dataset's privacy budget as used up."
)


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


def _utc_now() -> datetime:
    return datetime.now(UTC)


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
        return spent_by_job(self.entries())

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
            spent = spent_by_job(reading.entries)
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
            _write_atomic(self.reservations_path, canonical(reserved) + b"\n")
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
        values = append_values(
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
            previous = spent_by_job(reading.entries).get(job)
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
            record["entry_hash"] = entry_hash(record)
            record["signature"] = self._sign(record["entry_hash"].encode("ascii"))
            entry = LedgerEntry(**record)
            count = len(reading.entries)
            if not reading.has_head:
                # A fresh site: write an empty head first, so a crash between the two writes
                # below leaves the head one entry behind (recoverable), never a lone ledger.
                self._write_head(0, GENESIS_HASH)
            _write_atomic(self.path, reading.raw + canonical(entry.model_dump()) + b"\n")
            self._write_head(count + 1, entry.entry_hash)
        logger.info(
            "epsilon ledger: job %s round %d recorded, epsilon %.4g", job, round, epsilon_after
        )
        return entry

    # --- internals ---------------------------------------------------------------------------

    def _read(self) -> Reading:
        return read_ledger(self.path, self.head_path, self._signature_ok)

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
        payload = head_payload(count, last_entry_hash)
        document = {**payload, "signature": self._sign(canonical(payload))}
        _write_atomic(self.head_path, canonical(document) + b"\n")

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


def spent_by_job(entries: list[LedgerEntry]) -> dict[str, float]:
    """Job -> its epsilon after its latest entry in ``entries``, in order of first appearance."""
    spent: dict[str, float] = {}
    for entry in entries:
        spent[entry.job] = entry.epsilon_after
    return spent


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
