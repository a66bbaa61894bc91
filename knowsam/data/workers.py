"""Preparation's worker processes, stopped at once by an interrupt."""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Callable, Sequence
from typing import TypeVar

Job = TypeVar("Job")
Result = TypeVar("Result")


def map_in_workers(fn: Callable[[Job], Result], jobs: Sequence[Job], workers: int, chunksize: int) -> list[Result]:
    """``[fn(job) for job in jobs]`` in ``workers`` processes, in order.

    Workers ignore SIGINT (Ctrl-C reaches the whole process group): the main process stops, and
    leaving the pool terminates the workers at once instead of after every queued job, as a
    ``ProcessPoolExecutor`` would.
    """
    with multiprocessing.Pool(workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
        return pool.map(fn, jobs, chunksize=chunksize)
