"""The epsilon ledger's files as records: the entry and head schemas, and the checks of one read.

``site_app.ledger`` owns the files (locking, appending, reserving); this module says what their
bytes must be and names every way a read of them can be wrong. An entry line is the canonical
JSON (`canonical`: sorted keys, no whitespace, ASCII only, no NaN) of a `LedgerEntry`; the head
file is the canonical JSON of `head_payload` plus its ``signature``. Each line is parsed with
``json``, validated once against `LedgerEntry` (pydantic, ``extra="forbid"``, strict types), then
checked for canonical form, hash, signature, chain and head; every problem names the entry
(index, line, job and round when readable). `append_values` checks a new entry's values.
Signatures are checked by the caller's ``signature_ok(signature_base64, message) -> bool``:
this module holds no key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

from jobs.spec import Accountant

__all__ = [
    "GENESIS_HASH",
    "HEAD_SCHEMA",
    "LedgerEntry",
    "Reading",
    "append_values",
    "canonical",
    "entry_hash",
    "head_payload",
    "read_ledger",
]

logger = logging.getLogger("site_app.ledger")  # the ledger's own log, as before the split

GENESIS_HASH = "0" * 64
HEAD_SCHEMA = "fedseg.epsilon-ledger-head/1"

SignatureCheck = Callable[[str, bytes], bool]
"""(base64 signature, signed message) -> whether the site's public key verifies it."""


def _float_only(value: Any) -> Any:
    # Strict pydantic still takes an int for a float; append always writes floats ("2.0"), so an
    # int here is a hand edit, reported as a wrong type like any other.
    if not isinstance(value, float):
        raise PydanticCustomError("float_type", "Input should be a valid number")
    return value


_Float = Annotated[float, BeforeValidator(_float_only)]
_Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]

_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)


class LedgerEntry(BaseModel):
    """One DP training round of one job at this site, as written to the ledger.

    Carries only accounting numbers and a job name: never patient data.
    """

    model_config = _STRICT

    job: str
    """Job name or id (use the FLARE job id: a name reused for a new run cannot be recorded)."""
    round: int
    """0-based round index within the job."""
    steps: int
    """DP optimizer steps taken in that round."""
    sample_rate: _Float
    """Poisson sampling probability per step, in (0, 1]."""
    noise_multiplier: _Float
    """Gaussian noise std as a multiple of max_grad_norm, > 0."""
    accountant: str
    """``"rdp"`` or ``"prv"`` (a `jobs.spec.Accountant` value)."""
    epsilon_after: _Float
    """The job's cumulative epsilon after this round, as its accountant computed it."""
    delta: _Float
    """The delta that epsilon is stated at, in (0, 1)."""
    recorded_at: str
    """ISO-8601 UTC timestamp of the append."""
    previous_hash: _Hex64
    """The previous entry's ``entry_hash`` (hex sha256); "0"*64 for the first entry."""
    entry_hash: _Hex64
    """Hex sha256 of the canonical JSON of every other field except ``signature``."""
    signature: str
    """Base64 Ed25519 signature of ``entry_hash`` (its ASCII hex) by the site key."""


class _HeadDocument(BaseModel):
    model_config = _STRICT

    count: Annotated[int, Field(ge=0)]
    last_entry_hash: _Hex64
    schema_: Literal["fedseg.epsilon-ledger-head/1"] = Field(alias="schema")
    signature: str


_FIELDS = tuple(LedgerEntry.model_fields)
_FIELD_TYPES: dict[str, type] = {
    name: info.annotation for name, info in LedgerEntry.model_fields.items()
}
_HASHED_FIELDS = tuple(name for name in _FIELDS if name not in ("entry_hash", "signature"))


@dataclass(frozen=True)
class Reading:
    """One consistent read of both files; ``entries`` is trustworthy only without ``problems``."""

    raw: bytes
    entries: list[LedgerEntry]
    problems: list[str]
    has_head: bool


def canonical(document: dict[str, Any]) -> bytes:
    """The one byte form of a ledger record: sorted keys, no whitespace, ASCII, no NaN."""
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def entry_hash(record: dict[str, Any]) -> str:
    """Hex sha256 of the canonical JSON of the entry's fields other than its hash and signature."""
    return hashlib.sha256(canonical({name: record[name] for name in _HASHED_FIELDS})).hexdigest()


def head_payload(count: int, last_entry_hash: str) -> dict[str, Any]:
    """What the head file's signature is over."""
    return {"count": count, "last_entry_hash": last_entry_hash, "schema": HEAD_SCHEMA}


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


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


def _schema_problems(where: str, record: Any, error: ValidationError) -> list[str]:
    """`LedgerEntry`'s validation errors in the ledger's words: missing fields, then unexpected
    ones, then wrong types (in field order), then malformed hashes."""
    missing, unexpected, wrong = [], [], []
    for item in error.errors():
        kind, loc = item["type"], item["loc"]
        name = str(loc[0]) if loc else ""
        if kind == "model_type":
            return [f"{where}: expected a JSON object, found {type(record).__name__}"]
        if kind == "missing":
            missing.append(name)
        elif kind == "extra_forbidden":
            unexpected.append(name)
        elif kind == "string_pattern_mismatch":
            wrong.append((1, _FIELDS.index(name), f"{name}: expected 64 lowercase hex digits"))
        elif name in _FIELD_TYPES:
            found = type(record[name]).__name__
            expected = _FIELD_TYPES[name].__name__
            wrong.append((0, _FIELDS.index(name), f"{name}: expected {expected}, found {found}"))
        else:  # not expected from the schema above; reported in pydantic's words
            wrong.append((2, 0, f"{'.'.join(str(p) for p in loc)}: {item['msg']}"))
    problems = []
    if missing:
        problems.append(f"{where}: missing field(s) {', '.join(sorted(missing))}")
    if unexpected:
        problems.append(
            f"{where}: unexpected field(s) {', '.join(sorted(unexpected))}; an entry carries "
            "only the fields of LedgerEntry"
        )
    return problems + [f"{where}: {text}" for *_, text in sorted(wrong)]


def _check_line(
    index: int, line: bytes, signature_ok: SignatureCheck
) -> tuple[LedgerEntry | None, str, list[str]]:
    """(the entry if well-formed else None, how to name it, its problems)."""
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
    try:
        entry = LedgerEntry.model_validate(record)
    except ValidationError as error:
        return None, where, _schema_problems(where, record, error)

    problems = []
    if canonical(record) != line:
        problems.append(
            f"{where}: the line is not in canonical form (spacing, key order, escaping or "
            "number format changed, or a key repeated): it was edited by hand"
        )
    if entry_hash(record) != entry.entry_hash:
        problems.append(
            f"{where}: entry_hash does not match the entry's fields: a field was edited "
            "after the entry was written"
        )
    if not signature_ok(entry.signature, entry.entry_hash.encode("ascii")):
        problems.append(
            f"{where}: signature does not verify with the site's public key: the entry was "
            "forged or re-signed with another key"
        )
    return entry, where, problems


def _read_head(
    head_path: Path, signature_ok: SignatureCheck, problems: list[str]
) -> tuple[_HeadDocument | None, bool]:
    """(the head if present and valid, whether the head file exists); adds its problems."""
    name = head_path.name
    try:
        raw = head_path.read_bytes()
    except FileNotFoundError:
        return None, False
    try:
        document = json.loads(raw, parse_constant=_reject_constant)
    except ValueError as exc:
        problems.append(f"head file {name}: not valid JSON ({exc}); it was edited or corrupted")
        return None, True
    try:
        head = _HeadDocument.model_validate(document)
    except ValidationError:
        problems.append(
            f"head file {name}: expected {{count, last_entry_hash, schema: {HEAD_SCHEMA!r}, "
            f"signature}}, found {raw[:200]!r}; it was edited or corrupted"
        )
        return None, True
    payload = head_payload(head.count, head.last_entry_hash)
    if not signature_ok(head.signature, canonical(payload)):
        problems.append(
            f"head file {name}: signature does not verify with the site's public key: it "
            "was forged or re-signed with another key"
        )
        return None, True
    return head, True


def _check_head(
    path: Path, head: _HeadDocument, hashes: list[str | None], labels: list[str]
) -> list[str]:
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
            path,
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
        ends = f"it now ends at {labels[-1]}" if labels else "the ledger file is missing or empty"
        return [
            f"{_span(found, count - 1)} missing: {recorded} ({ends}); entries were removed "
            "from the end"
        ]
    return [
        f"{labels[count]}: {recorded}; the head and ledger do not match (entries added "
        "without the site key's head update, or the head was replaced by an older one)"
    ]


def read_ledger(path: Path, head_path: Path, signature_ok: SignatureCheck) -> Reading:
    """Read the ledger at ``path`` and its head, and every problem with them (caller locks)."""
    problems: list[str] = []
    head, has_head = _read_head(head_path, signature_ok, problems)
    try:
        raw = path.read_bytes()
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
        entry, where, line_problems = _check_line(index, line, signature_ok)
        problems.extend(line_problems)
        labels.append(where)
        if entry is None:
            hashes.append(None)
            previous = None  # the next entry's link cannot be checked; one report suffices
            continue
        if previous is not None and entry.previous_hash != previous:
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
        previous = entry.entry_hash
        hashes.append(previous)
        entries.append(entry)

    if not has_head:
        if has_ledger:
            last = f"; the last entry is {labels[-1]}" if labels else ""
            problems.append(
                f"head file {head_path.name} is missing next to a ledger of "
                f"{len(lines)} entries{last}: without it, entries removed from the end "
                "cannot be ruled out"
            )
    elif head is not None:
        problems.extend(_check_head(path, head, hashes, labels))
    return Reading(raw=raw, entries=entries, problems=problems, has_head=has_head)


def append_values(**values: Any) -> dict[str, Any]:
    """A new entry's values as `EpsilonLedger.append` is given them, checked (``ValueError``
    naming the field) and normalised: floats as float, the accountant as its value."""

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
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
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
