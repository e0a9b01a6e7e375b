"""How a pydantic ``ValidationError`` reads to a person: one message for every file fedseg
validates (job spec, site config, run history, report).

The message names the file, then one line per problem: the field (dotted path), what was
expected (pydantic's own words) and what was found (``got ...``), then what to do::

    spec.yaml: 2 problem(s) in the job spec:
      - training.lr: Input should be greater than 0, got -1
      - modle: unknown key (check the spelling; ...)
      fix the field(s) above in spec.yaml
"""

from __future__ import annotations

from pydantic import ValidationError

__all__ = ["format_validation_error"]

_NOTHING_FOUND = ("extra_forbidden", "missing")
"""Error types whose input is not worth showing: an unknown key's value, a missing field's
parent mapping."""


def format_validation_error(
    error: ValidationError,
    source: str,
    *,
    document: str,
    unknown_key: str = "unknown key (check the spelling)",
    fix: str | None = None,
) -> str:
    """``error`` as the lines above. ``source`` names the file (or what it came from),
    ``document`` what it holds ("the job spec"), ``unknown_key`` replaces pydantic's message for
    a key the schema does not have, ``fix`` is the last line (default: fix the fields in
    ``source``)."""
    lines = [f"{source}: {error.error_count()} problem(s) in {document}:"]
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = unknown_key
        found = "" if item["type"] in _NOTHING_FOUND else f", got {item.get('input')!r}"
        if message.startswith(location):
            lines.append(f"  - {message}")
        else:
            lines.append(f"  - {location}: {message}{found}")
    lines.append(f"  {fix or f'fix the field(s) above in {source}'}")
    return "\n".join(lines)
