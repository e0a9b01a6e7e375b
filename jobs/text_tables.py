"""Numbers and tables as text, one way for every report, comparison and CLI table.

``format_number`` prints a value with a fixed number of decimals, and "-" for a value that is
missing or not finite (None, NaN, inf); ``markdown_table`` lays rows of cells out as a GitHub
markdown table.
"""

from __future__ import annotations

import math

__all__ = ["format_number", "markdown_table"]


def format_number(value: float | None, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals; "-" when it is None or not finite."""
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table: the header row, the separator, then one line per row (no final newline)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
