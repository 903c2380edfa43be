"""Two process-wide settings minifca makes when it is imported, before NumPy loads (no NumPy import here).

1. OpenBLAS's idle threads spin for 2**28 cycles (~0.1 s) after every product by default and so take
   the cores from the Numba loops between two products: on 16 cores the numba forward ran 1.8-2.1x
   slower for it (MiniLM 8x128: 147.6 ms at the default, 69.7 ms at 2**12; BENCHMARKS.md).
   `OPENBLAS_THREAD_TIMEOUT=12` unless set. OpenBLAS reads it once, when NumPy is first imported: a
   program that imports NumPy before minifca should export it itself.
2. glibc's malloc hands every block of >= 128 KiB to the kernel and back (mmap/munmap, or trimming the
   heap top), so each large NumPy temporary of a forward can be fresh pages, faulted in one by one; once
   `import numba` has come after NumPy's first large arrays the adaptive threshold stays low, and the
   same erf over [128, 1536] took 2.2-2.6 ms instead of 0.54 ms. `mallopt` keeps blocks under 256 MiB in
   the heap and up to 256 MiB of free memory at its top (peak RSS after load + one forward unchanged
   within 4%): the numpy backend's MiniLM forward 1.1-1.7x faster, the numba backend's unchanged within
   run-to-run noise (BENCHMARKS.md). Skipped when MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ are set, off with
   MINIFCA_MALLOPT=0, and where the C library has no mallopt (not glibc).
"""
import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3                  # glibc's mallopt parameters
KEEP_BYTES = 256 << 20


def configure():
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "12")
    if (sys.platform != "linux" or os.environ.get("MINIFCA_MALLOPT", "1") == "0"
            or "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):                         # musl and others: nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))
