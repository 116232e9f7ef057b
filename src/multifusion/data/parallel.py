"""The one parallel map of the package: ``work(item)`` over items on worker processes,
results in input order, with BLAS held to one thread per process.

Used by ``prepare`` (decode, preprocess and hash every file) and ``synthesize`` (render
every image).
"""

from __future__ import annotations

import os
import signal
import threading
from multiprocessing import Pool
from typing import Callable, Iterator, TypeVar

from threadpoolctl import threadpool_limits
from tqdm import tqdm

S = TypeVar("S")
T = TypeVar("T")


def parallel_map(work: Callable[[S], T], items: list[S], workers: int, progress: bool = True,
                 desc: str = "prepare", chunksize: int | None = None) -> Iterator[T]:
    """``work(item)`` for every item, in order, on ``workers`` processes (0 = all cores),
    with a progress bar named ``desc``. Serial when one worker or fewer than two items per
    worker; ``work`` and the items must pickle otherwise. Items go to the workers in
    chunks of ``chunksize`` (None: a quarter of each worker's share, 1..128).

    BLAS is held to one thread here, before the worker processes fork, so they inherit
    it: the products per item are small, and a multi-threaded BLAS in each of ``cores``
    processes oversubscribes the cores (15x slower on 2 cores); a limit set in a pool
    initializer instead leaves each worker an idle BLAS thread spinning at ~50% of a
    core (both measured).

    Ctrl-C is the parent's alone: the workers are started with SIGINT ignored (it goes to
    the whole process group), so the parent gets one KeyboardInterrupt, the pool is
    terminated, and no worker prints a traceback."""
    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=len(items), desc=desc, unit="img", disable=not progress)
    chunksize = chunksize or max(1, min(128, len(items) // (4 * workers)))
    with threadpool_limits(limits=1, user_api="blas"):
        if workers == 1 or len(items) < 2 * workers:
            for item in items:
                yield work(item)
                bar.update()
        else:
            with _pool_deaf_to_ctrl_c(workers) as pool:
                for result in pool.imap(work, items, chunksize=chunksize):
                    yield result
                    bar.update()
    bar.close()


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _pool_deaf_to_ctrl_c(workers: int) -> Pool:
    """A Pool whose workers ignore SIGINT from birth: the parent ignores it while they are
    forked (a Ctrl-C in that moment is lost, not printed by a worker), and each worker sets
    it again (start methods that do not fork)."""
    if threading.current_thread() is not threading.main_thread():
        return Pool(workers, initializer=_ignore_sigint)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return Pool(workers, initializer=_ignore_sigint)
    finally:
        signal.signal(signal.SIGINT, previous)
