"""`threads=`: how many threads one call may use, in Numba's parallel loops and in the BLAS (OpenBLAS,
MKL) and OpenMP pools that NumPy's matrix products run on (set through threadpoolctl).

The limits are process-wide for BLAS (threadpoolctl) and per calling thread for Numba, and are put back
when the call returns; two threads calling with different limits at once share the BLAS setting of
whichever set it last.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np

from .errors import InputError

_controller = None   # threadpoolctl's view of the loaded BLAS/OpenMP libraries, found once
_local = threading.local()   # .depth: limits open in this thread (a call inside a limited call keeps its limit)


def active() -> bool:
    """Whether this thread is inside a thread_limit (embed's limit then holds for the forwards it makes)."""
    return getattr(_local, "depth", 0) > 0


def check_threads(threads):
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise InputError(f"threads must be a positive integer (or None: all that are configured), got {threads!r}")
    return int(threads)


@contextmanager
def thread_limit(threads, numba=True):
    """Run the body with at most `threads` threads (None: no limit). numba=False leaves Numba alone
    (the numpy and cuda backends run no Numba parallel loops)."""
    threads = check_threads(threads)
    if threads is None:
        yield
        return
    global _controller
    from threadpoolctl import ThreadpoolController
    if _controller is None:
        _controller = ThreadpoolController()
    before = None
    if numba:
        import numba as nb
        top = nb.config.NUMBA_NUM_THREADS
        if threads > top:
            raise InputError(f"threads={threads}: Numba was started with {top} threads (NUMBA_NUM_THREADS, by default "
                             "the number of cores), the most one call can use")
        before = nb.get_num_threads()
        nb.set_num_threads(threads)
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        with _controller.limit(limits=threads):
            yield
    finally:
        _local.depth -= 1
        if before is not None:
            nb.set_num_threads(before)
