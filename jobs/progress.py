"""fedseg's one progress bar (rich): what is being done, a bar, done/total [unit], time elapsed.

Long work at a site, the server or the simulator shows it the same way; ``enabled=False`` keeps
the same object silent, so callers never branch on whether a bar is shown.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["progress_bar"]


def progress_bar(
    *,
    unit: str | None = None,
    console: Console | None = None,
    enabled: bool = True,
    transient: bool = False,
) -> Progress:
    """A rich ``Progress`` with fedseg's columns; use it as a context manager.

    ``unit`` is printed after the count ("3/10 rounds"); ``transient`` clears the bar when done.
    """
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    if unit:
        columns.append(TextColumn(unit))
    columns.append(TimeElapsedColumn())
    return Progress(*columns, console=console, disable=not enabled, transient=transient)
