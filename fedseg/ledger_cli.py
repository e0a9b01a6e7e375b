"""``fedseg site ledger``: parsing and printing only.

The ledger, its verification and its records are ``site_app.ledger``'s and
``site_app.ledger_format``'s. Exit status: 0 when the ledger verifies, 1 when it does not.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING

from rich.markup import escape
from rich.table import Table

from fedseg.terminal import console, error_console

if TYPE_CHECKING:  # imported lazily, so `fedseg --help` stays fast
    from site_app.ledger import EpsilonLedger


def ledger_table(ledger: EpsilonLedger, *, budget: float | None) -> Table:
    """One row per entry, with a caption of epsilon used and left of ``budget`` (None: no budget).

    Raises `LedgerTampered` when the ledger fails verification: a table of unverified numbers
    would look trustworthy.
    """
    from site_app.ledger import spent_by_job

    if budget is not None and not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"ledger_table: budget: expected a number > 0 or None, got {budget!r}")
    entries = ledger.entries()
    spent = spent_by_job(entries)
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


def _site_ledger(args: argparse.Namespace) -> int:
    from site_app.ledger import EpsilonLedger, LedgerTampered

    ledger_path = Path(args.ledger)
    key_path = Path(args.key) if args.key else ledger_path.parent / "site_key.pem"
    ledger = EpsilonLedger.open(path=ledger_path, key_path=key_path)
    problems = ledger.verify()
    if problems:
        error_console.print(str(LedgerTampered(ledger_path, problems)), markup=False)
        return 1
    console.print(ledger_table(ledger, budget=args.budget))
    console.print(f"[green]verified[/green]: {len(ledger.entries())} entries, chain and signatures")
    return 0


def register(site_commands: argparse._SubParsersAction) -> None:
    """Add ``site ledger`` to the ``fedseg site`` command group."""
    ledger = site_commands.add_parser(
        "ledger", help="show and verify the site's epsilon ledger (all jobs, budget left)"
    )
    ledger.add_argument("--ledger", required=True, help="the ledger file (epsilon_ledger.jsonl)")
    ledger.add_argument("--key", help="the site's signing key (default: site_key.pem beside it)")
    ledger.add_argument("--budget", type=float, help="the site's total epsilon budget")
    ledger.set_defaults(handler=_site_ledger)
