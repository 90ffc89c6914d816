"""Helper processes, for every layer: forked from this one, so they inherit what they work on instead
of having it pickled to them, and bound to it, so none outlives a run that was killed."""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor


def forked_pool(workers: int, warm_up: Callable[[], object] | None = None) -> ProcessPoolExecutor | None:
    """`workers` forked processes (fewer if there are fewer cores), started now, each running
    `warm_up` (an import, say) as it starts; None where helpers would not help or cannot be bound to
    this process: one core, or not Linux, whose prctl alone ties a child's life to its parent's.

    A process pool, unlike multiprocessing.Pool, fails (BrokenProcessPool) when a worker dies
    instead of waiting for its result forever: callers then do that work themselves."""
    cores = len(os.sched_getaffinity(0)) if sys.platform == "linux" else 1
    if cores < 2 or workers < 1:
        return None
    workers = min(workers, cores)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_bound_to, initargs=(os.getpid(), warm_up))
    pool.submit(int)  # a fork context starts every worker at the first submission: start them now
    return pool


def _bound_to(parent: int, warm_up: Callable[[], object] | None) -> None:
    """A helper process dies with the process that forked it: one killed halfway must not leave them
    behind, holding its terminal or its caller's pipes open. Ctrl-C is left to that process (whose
    handlers it would otherwise inherit); SIGTERM ends it (the pool's own way to stop a worker),
    and its work is then done by that process."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the line above took effect
        os._exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if warm_up is not None:
        warm_up()
