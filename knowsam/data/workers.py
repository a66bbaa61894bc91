"""Worker processes for preparation and scoring, stopped at once by an interrupt."""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Callable, Sequence
from typing import TypeVar

Job = TypeVar("Job")
Result = TypeVar("Result")

_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _start_worker() -> None:
    """Ctrl-C reaches the whole process group: workers ignore it and leave stopping to the main
    process. SIGTERM (``Pool.terminate``) ends a worker at once. Both were blocked since before the
    fork (see :func:`map_in_workers`); one that arrived meanwhile is delivered here."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def map_in_workers(fn: Callable[[Job], Result], jobs: Sequence[Job], workers: int, chunksize: int) -> list[Result]:
    """``[fn(job) for job in jobs]`` in ``workers`` processes, in order.

    Fork where available: workers start at once with modules already imported and need no ``__main__`` guard in
    the caller's script (they run numpy, PIL and scipy code only, never the parent's threads).
    Leaving the pool terminates the workers at once, instead of after every queued job as a
    ``ProcessPoolExecutor`` would (whose management thread also prints a traceback when its
    workers die first).

    The stop signals are blocked across the forks: a job that fails at once makes ``terminate``
    send SIGTERM to a worker forked microseconds earlier, and CPython discards a signal that
    reaches its Python-level handler before the child's after-fork reset. The worker then waited
    on the task queue for ever and the command hung (seen in the test suite).
    """
    if "fork" not in multiprocessing.get_all_start_methods():  # Windows: spawned workers, default signals
        pool = multiprocessing.get_context().Pool(workers)
    else:
        previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            pool = multiprocessing.get_context("fork").Pool(workers, initializer=_start_worker)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
    with pool:
        return pool.map(fn, jobs, chunksize=chunksize)
