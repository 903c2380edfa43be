"""`threads=`: how many threads one call may use, in Numba's parallel loops and in the BLAS (OpenBLAS,
MKL) and OpenMP pools that NumPy's matrix products run on (set through threadpoolctl).

The limits are process-wide for BLAS (threadpoolctl) and per calling thread for Numba. Numba's is put back
when the call returns; BLAS's when the last of the calls limiting it at once returns, to what it was before
the first (two threads calling with different limits at once share the BLAS setting of whichever set it last).
A caveat of NumPy's OpenBLAS (0.3.31 here), not of minifca: raising its count from a thread other than the one
that lowered it does not always take (reproduced with threadpoolctl alone: one thread sets 1 and stays alive,
another sets 2, the count reads 1). So `threads=` calls overlapping in several threads can leave BLAS at 1
thread; `threadpoolctl.threadpool_limits` from the thread that lowered it puts it back. `side_by_side` lowers
the count only when no other thread holds a limit, and so raises it again from the thread that lowered it.

`side_by_side` runs many independent jobs (embed's and classify's batches) a few at a time, each on a thread
of its own with one thread inside, instead of one at a time with every thread inside each.
"""
from __future__ import annotations

import itertools
import sys
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext

import numpy as np

from .errors import InputError

_controller, _modules_seen = None, 0   # threadpoolctl's view of the loaded BLAS/OpenMP libraries; len(sys.modules) then
_blas_lock = threading.Lock()
_blas = {"open": {}, "first": None}  # thread id -> limits it has open; the first one's limiter (it knows the original)
_local = threading.local()   # .limits: the limits open in this thread (a call inside a limited call keeps its limit)


def active() -> bool:
    """Whether this thread is inside a thread_limit (embed's limit then holds for the forwards it makes)."""
    return bool(getattr(_local, "limits", None))


def current():
    """The innermost limit open in this thread, or None."""
    return _local.limits[-1] if active() else None


def check_threads(threads):
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise InputError(f"threads must be a positive integer (or None: all that are configured), got {threads!r}")
    return int(threads)


@contextmanager
def thread_limit(threads, numba=True, blas=True):
    """Run the body with at most `threads` threads (None: no limit). numba=False leaves Numba alone
    (the numpy and cuda backends run no Numba parallel loops); blas=False leaves BLAS's count as it is
    (side_by_side's workers: their caller has set it)."""
    threads = check_threads(threads)
    if threads is None:
        yield
        return
    before = None
    if numba:
        import numba as nb
        top = nb.config.NUMBA_NUM_THREADS
        if threads > top:
            raise InputError(f"threads={threads}: Numba was started with {top} threads (NUMBA_NUM_THREADS, by default "
                             "the number of cores), the most one call can use")
        before = nb.get_num_threads()
        nb.set_num_threads(threads)
    _local.limits = getattr(_local, "limits", []) + [threads]
    try:
        with _blas_limit(threads) if blas else nullcontext():
            yield
    finally:
        _local.limits = _local.limits[:-1]
        if before is not None:
            nb.set_num_threads(before)


def _find_libraries():
    """threadpoolctl's controller of the BLAS/OpenMP libraries loaded, found again after any import since the
    last search (scipy's own OpenBLAS, for one, loads when Numba first compiles a kernel)."""
    global _controller, _modules_seen
    if _controller is None or len(sys.modules) != _modules_seen:
        from threadpoolctl import ThreadpoolController
        _controller, _modules_seen = ThreadpoolController(), len(sys.modules)


@contextmanager
def _blas_limit(threads, unless_held=False):
    """BLAS's process-wide thread count at `threads` in the body; the count from before the first of the limits
    open at once comes back when the last closes (a limit closing while another is open leaves it alone).
    unless_held: set nothing if a limit is open in another thread (see side_by_side). Yields whether it set."""
    me, opened = threading.get_ident(), _blas["open"]
    with _blas_lock:
        limited = not (unless_held and any(t != me for t in opened))
        if limited:
            _find_libraries()
            limiter = _controller.limit(limits=threads)              # set now
            if not opened:
                _blas["first"] = limiter
            opened[me] = opened.get(me, 0) + 1
    try:
        yield limited
    finally:
        if limited:
            with _blas_lock:
                opened[me] -= 1
                if not opened[me]:
                    del opened[me]
                if not opened:
                    _blas["first"].restore_original_limits()
                    _blas["first"] = None


def side_by_side(fn, items, workers):
    """fn(item) for every item, `workers` items at a time, each on a thread of its own with one thread inside
    (Numba and BLAS): yields the results in the items' order, each once it and those before it are done.

    On a few cores this is faster for many small forwards than giving each forward every thread: a forward
    then hands each matrix product and each parallel loop to the other threads and waits for them, dozens of
    times per layer, and on a loaded machine waits for threads the OS has descheduled (benchmarks/
    bench_workload.py measures both ways). BLAS's thread count is process-wide: it is 1 until the last result
    is yielded, for the caller too. At most 2 x workers items are in flight.

    fn runs on each item in turn, in this thread, with the limits as they are, for workers=1, and also while a
    limit is open in another thread: this OpenBLAS may not let the count rise again from a thread other than
    the one that lowered it (see the top of this module), so only a caller alone lowers it, and raises it again.
    """
    if workers < 2:
        yield from map(fn, items)
        return
    with _blas_limit(1, unless_held=True) as alone:
        if not alone:
            yield from map(fn, items)
            return
        items = iter(items)

        def one(item):
            with thread_limit(1, blas=False):                        # this worker: Numba 1 thread; BLAS 1, as set
                return fn(item)
        with ThreadPoolExecutor(workers, thread_name_prefix="minifca") as pool:
            pending = deque(pool.submit(one, item) for item in itertools.islice(items, 2 * workers))
            while pending:
                result = pending.popleft().result()
                pending.extend(pool.submit(one, item) for item in itertools.islice(items, 1))
                yield result
