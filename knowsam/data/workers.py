"""Worker processes for preparation and scoring, stopped at once by an interrupt."""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Callable, Sequence
from typing import TypeVar

Job = TypeVar("Job")
Result = TypeVar("Result")


def map_in_workers(fn: Callable[[Job], Result], jobs: Sequence[Job], workers: int, chunksize: int) -> list[Result]:
    """``[fn(job) for job in jobs]`` in ``workers`` processes, in order.

    Fork where available: workers start at once with modules already imported and need no
    ``__main__`` guard in the caller's script (they run numpy, PIL and scipy code only, never
    the parent's threads). Workers ignore SIGINT (Ctrl-C reaches the whole process group): the
    main process stops, and leaving the pool terminates the workers at once, instead of after
    every queued job as a ``ProcessPoolExecutor`` would (whose management thread also prints a
    traceback when its workers die first).
    """
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with context.Pool(workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
        return pool.map(fn, jobs, chunksize=chunksize)
