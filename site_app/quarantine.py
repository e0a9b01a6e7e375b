"""The quarantine list: every file or series ingestion could not use, with a plain-language reason.

Entries name files by their path relative to the site's data folder and series by `series_key`
(a hash); they never carry patient names, IDs, dates or raw UIDs. Written as `quarantine.json`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from jobs.atomic_files import atomic_write

SCHEMA = "fedseg.quarantine/1"


class QuarantineReason(StrEnum):
    """Why a file or series was set aside. Values are stable snake_case strings (used in JSON);
    a `StrEnum`, so each member is also that string."""

    NOT_DICOM = "not_dicom"
    TRUNCATED = "truncated"
    UNDECODABLE_PIXELS = "undecodable_pixels"
    MISSING_GEOMETRY = "missing_geometry"
    MIXED_ORIENTATION = "mixed_orientation"
    MISSING_SLICES = "missing_slices"
    DUPLICATE_INSTANCE = "duplicate_instance"
    MIXED_SERIES = "mixed_series"
    UNSUPPORTED_MODALITY = "unsupported_modality"
    LABEL_WITHOUT_SERIES = "label_without_series"
    LABEL_SIZE_MISMATCH = "label_size_mismatch"
    UNLABELLED_SERIES = "unlabelled_series"


@dataclass(frozen=True)
class QuarantineEntry:
    """One rejected file or series.

    ``path`` is POSIX and relative to the data root: a file, or the folder holding a series' files
    (their common parent; ``"."`` for the root itself). ``detail`` says what is wrong and what to
    do, without patient data. ``series_key`` names the series concerned, if any. ``files`` lists
    the files (relative POSIX paths) an entry about a series or folder covers; it is kept in
    memory only (not written to ``quarantine.json``, not compared) and is empty for an entry about
    one file, whose ``path`` is that file.
    """

    path: str
    reason: QuarantineReason
    detail: str
    series_key: str | None = None
    files: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @property
    def covered_files(self) -> tuple[str, ...]:
        """Every file this entry sets aside: ``files``, or ``(path,)`` for a one-file entry."""
        return self.files or (self.path,)

    def sort_key(self) -> tuple[str, str, str, str]:
        return (self.path, self.reason.value, self.series_key or "", self.detail)


def sorted_entries(entries: Iterable[QuarantineEntry]) -> list[QuarantineEntry]:
    """Entries in the stable order used everywhere: by path, then reason, series key, detail."""
    return sorted(entries, key=QuarantineEntry.sort_key)


_UID_LIKE = re.compile(r"\d+(?:\.\d+){3,}")
_MEMORY_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def describe_error(exc: Exception) -> str:
    """Exception type and message on one line, UIDs and memory addresses masked, at most 200
    characters: for an entry's ``detail`` (shown to site admins, stable from run to run)."""
    message = _UID_LIKE.sub("<uid>", " ".join(str(exc).split()))
    message = _MEMORY_ADDRESS.sub("", message)  # keeps details identical from run to run
    message = message if len(message) <= 200 else message[:199] + "…"
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def write_quarantine(entries: Iterable[QuarantineEntry], path: Path) -> None:
    """Write ``entries`` to ``path`` as JSON (stable order; atomic: temp file then rename).

    Schema: ``{"schema": "fedseg.quarantine/1", "entries": [{"path", "reason", "detail",
    "series_key"}, ...]}`` with ``reason`` one of the `QuarantineReason` values and
    ``series_key`` a string or null.
    """
    document = {
        "schema": SCHEMA,
        "entries": [
            {
                "path": e.path,
                "reason": e.reason.value,
                "detail": e.detail,
                "series_key": e.series_key,
            }
            for e in sorted_entries(entries)
        ],
    }
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    atomic_write(path, text.encode("utf-8"), durable=False)


def read_quarantine(path: Path) -> list[QuarantineEntry]:
    """Read a file written by `write_quarantine`.

    Raises ``ValueError`` naming the file and the offending entry when the content does not
    follow the schema (e.g. an unknown reason written by a newer fedseg).
    """
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); "
            "delete it and re-run `fedseg site check` to regenerate it"
        ) from None
    if not isinstance(document, dict) or document.get("schema") != SCHEMA:
        found = document.get("schema") if isinstance(document, dict) else type(document).__name__
        raise ValueError(
            f"{path}: expected schema {SCHEMA!r}, found {found!r}; "
            "regenerate it with this version of fedseg"
        )
    entries = []
    for index, raw in enumerate(document.get("entries", [])):
        try:
            entries.append(
                QuarantineEntry(
                    path=str(raw["path"]),
                    reason=QuarantineReason(raw["reason"]),
                    detail=str(raw["detail"]),
                    series_key=None if raw.get("series_key") is None else str(raw["series_key"]),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"{path}: entries[{index}] is malformed ({type(exc).__name__}: {exc}); "
                "each entry needs path, reason (a known value), detail and series_key"
            ) from None
    return entries
