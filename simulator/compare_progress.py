"""The comparison's console progress: one rich progress bar per run, then a one-line summary of
the row it produced (silent without a console).
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import Progress

from jobs.progress import progress_bar
from simulator.compare_results import MethodResult

__all__ = ["RunProgress", "row_summary"]


class RunProgress:
    """One rich progress bar per run, plus a summary line when it ends (silent without console)."""

    def __init__(self, console: Console | None) -> None:
        self.console = console
        self._bar: Progress | None = None
        self._task = None

    def start(self, description: str, total: int) -> None:
        if self.console is None:
            return
        self._bar = progress_bar(console=self.console, transient=True)
        self._bar.start()
        self._task = self._bar.add_task(description, total=total)

    def advance(self, description: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=description)

    def stop(self, summary: str) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self.console is not None:
            self.console.print(summary)


def row_summary(row: MethodResult) -> str:
    dice = "-" if row.mean_dice is None else f"{row.mean_dice:.3f}"
    hd95 = "-" if row.mean_hd95_mm is None else f"{row.mean_hd95_mm:.1f} mm"
    epsilon = "" if row.max_epsilon is None else f", epsilon up to {row.max_epsilon:.2f}"
    return (
        f"[green]done[/green] {row.label}: mean Dice {dice}, HD95 {hd95}{epsilon} "
        f"({row.steps} steps, {row.wall_s:.0f} s) -> {row.run_dir}"
    )
