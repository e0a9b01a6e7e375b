"""The terminal the ``fedseg`` commands write to: one stdout and one stderr console, results
tables at full width when redirected, the error a user can fix, and argparse number types."""

from __future__ import annotations

import argparse

from rich.console import Console

__all__ = ["UserError", "console", "error_console", "int_at_least", "print_table"]

# soft_wrap: never break paths in messages across lines. emoji=False: ":CD:" in a fingerprint
# or ":smile:" in a site's message is text, not an emoji code (escape() does not cover those).
console = Console(soft_wrap=True, emoji=False)
error_console = Console(stderr=True, soft_wrap=True, emoji=False)


def print_table(table) -> None:
    """A results table; into a log file or pipe at full width instead of rich's 80 columns.

    Redirected, rich squeezes a 12-column comparison into 80 columns and cuts every number.
    """
    if console.is_terminal:
        console.print(table)
        return
    width = console.width
    console.width = max(width, 240)
    try:
        console.print(table)
    finally:
        console.width = width


class UserError(Exception):
    """A problem the user can fix; printed without a traceback."""


def int_at_least(minimum: int):
    """An argparse type: a whole number >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {value}")
        return value

    return parse
