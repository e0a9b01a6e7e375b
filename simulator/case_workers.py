"""Writing many case folders, in a pool of worker processes when there are enough of them, with
a rich progress bar. Each case draws from its own seeded generator, so the bytes do not depend on
the number of workers or the order in which they finish; results come back in job order.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed

from jobs.progress import progress_bar
from simulator.case_writer import CaseJob, CaseWritten, write_case

__all__ = ["write_cases"]

# A worker process costs about a second to start (imports, highdicom's tables of the standard),
# the work of some 8 patients: fewer patients than this per worker are written in-process.
_PATIENTS_PER_WORKER = 16


def write_cases(
    jobs: Sequence[CaseJob], *, workers: int | None, progress: bool
) -> list[CaseWritten]:
    """Write every job, in worker processes when there are enough; results in job order."""
    count = _worker_count(workers, len(jobs))
    description = f"synthetic patients ({count} worker{'s' if count > 1 else ''})"
    with progress_bar(enabled=progress) as bar:
        task = bar.add_task(description, total=len(jobs))
        if count == 1:
            written = []
            for job in jobs:
                written.append(write_case(job))
                bar.advance(task)
            return written
        # spawn, not fork: the caller may hold threads (rich's, torch's) that fork would copy
        # in whatever state they are in.
        context = multiprocessing.get_context("spawn")
        # Workers ignore Ctrl-C: this process stops them, after their current patient.
        ignore_interrupt = (signal.SIGINT, signal.SIG_IGN)
        with ProcessPoolExecutor(
            max_workers=count,
            mp_context=context,
            initializer=signal.signal,
            initargs=ignore_interrupt,
        ) as pool:
            futures = [pool.submit(write_case, job) for job in jobs]
            try:
                for future in as_completed(futures):
                    future.result()  # the first failure stops the run
                    bar.advance(task)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            return [future.result() for future in futures]


def _worker_count(requested: int | None, jobs: int) -> int:
    if requested is not None:
        if requested < 1:
            raise ValueError(f"workers: expected an int >= 1, got {requested}")
        return max(1, min(requested, jobs))
    available = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    return max(1, min(available, jobs // _PATIENTS_PER_WORKER))
