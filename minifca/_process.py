"""Three process-wide settings minifca makes when it is imported, before NumPy loads (no NumPy import here).

1. OpenBLAS's idle threads spin for 2**28 cycles (~0.1 s) after every product by default and so take
   the cores from the Numba loops between two products: on 16 cores the numba forward ran about twice
   as slow for it (BENCHMARKS.md, "CPU on 16 cores").
   `OPENBLAS_THREAD_TIMEOUT=12` unless set. OpenBLAS reads it once, when NumPy is first imported: a
   program that imports NumPy before minifca should export it itself.
2. glibc's malloc hands every block of >= 128 KiB to the kernel and back (mmap/munmap, or trimming the
   heap top), so each large NumPy temporary of a forward can be fresh pages, faulted in one by one; once
   `import numba` has come after NumPy's first large arrays the adaptive threshold stays low, and the
   same element-wise work took several times longer. `mallopt` keeps blocks under 256 MiB in the heap
   and up to 256 MiB of free memory at its top (peak RSS after load + one forward unchanged): the numpy
   backend's forward faster, the numba backend's unchanged within run-to-run noise (BENCHMARKS.md,
   benchmarks/ab_mallopt.py). Skipped when MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ are set, off with
   MINIFCA_MALLOPT=0, and where the C library has no mallopt (not glibc).
3. Numba's threading layer is TBB (`tbb` wheel) instead of GNU OpenMP, so that torch in the same process
   neither slows minifca down nor is slowed by it: see `choose_threading_layer`, and
   benchmarks/beside_torch.py for the figures.
"""
import ctypes
import os
import sys
from importlib import metadata

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3                  # glibc's mallopt parameters
KEEP_BYTES = 256 << 20


def configure():
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "12")
    choose_threading_layer()
    return set_malloc_thresholds()


def set_malloc_thresholds(over_env=False):
    """over_env: also where MALLOC_*_THRESHOLD_ are set (a Dask worker: its nanny sets MALLOC_TRIM_THRESHOLD_)."""
    if (sys.platform != "linux" or os.environ.get("MINIFCA_MALLOPT", "1") == "0"
            or (not over_env and ("MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ))):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):                         # musl and others: nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))


TBB_LIBRARY = {"linux": "libtbb.so.12", "darwin": "libtbb.12.dylib", "win32": "tbb12.dll"}


def load_tbb():
    """Load the `tbb` wheel's libtbb (pip puts it in <prefix>/lib, where the loader does not look), so that
    Numba's own check and its tbbpool find it by name. The path, or None where the wheel is missing."""
    name = TBB_LIBRARY.get(sys.platform)
    try:
        files = metadata.files("tbb") or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == name:
            path = str(f.locate())
            try:
                ctypes.CDLL(path)
            except OSError:
                return None
            return path
    return None


def choose_threading_layer():
    """3. Numba's threading layer: TBB where the `tbb` wheel is installed (Numba's own first choice, once it can
    find the library), else GNU OpenMP with idle threads asleep. Unless the user set NUMBA_THREADING_LAYER.

    TBB is not an OpenMP runtime, so nothing else in the process can take over its pool: torch loads its own
    libgomp with RTLD_GLOBAL, and a Numba `omp` pool started after that binds GOMP_parallel to torch's
    runtime (LD_DEBUG=bindings shows it), whose wait policy was read when torch loaded: its threads spin
    after every Numba loop and starve the OpenBLAS product that follows (benchmarks/beside_torch.py). Setting
    OMP_WAIT_POLICY ourselves did that work only when no runtime had started yet, and leaked into torch's
    runtime when torch came second (torch slower, with idle threads asleep between its parallel regions).
    TBB is also safe for calls from several Python threads at once (workqueue aborts) and after fork.
    Returns the path of the libtbb loaded, or None."""
    if "NUMBA_THREADING_LAYER" in os.environ:
        layer = os.environ["NUMBA_THREADING_LAYER"]
        path = load_tbb() if layer in ("tbb", "safe", "threadsafe", "default") else None
    else:
        path = load_tbb()
    if path is None:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # the omp layer, if nothing has started one yet
    return path
