"""Where a job's tasks run: here, in order, or on a Dask cluster (`--cluster local:N` or `--cluster tcp://host:8786`).

The jobs (eval, ablate, calibrate, embed) cut their work into tasks, one (configuration, data shard) each, and
hand them to a runner; the same task function runs in both places, so a cluster changes where the work is
done and nothing else.

    Serial()                      runs each task in this process, in order: every job without --cluster
    connect(spec)                 a Dask runner: 'local:N' starts N single-threaded worker processes here,
                                  'tcp://host:8786' joins a running scheduler (README: `dask scheduler`)
    runner.share(obj)             data the tasks read (a job's tokenized shards): sent once, not per task
    runner.map(fn, model, tasks)  yields (i, fn(model, *tasks[i])) as each task finishes (Serial: in order)

Serial calls fn with the model it is given. A worker loads the model once per process (`worker_model`, keyed
by path, backend and the checkpoint files' sizes and times) and keeps it for the tasks after. Dask reruns the
tasks of a worker that dies on the others; map yields each task once. Results come back to the client, which
alone writes the output files.

Needs the `distributed` extra (pip install -e '.[distributed]'); the serial path needs nothing of it.
"""
from __future__ import annotations

import os
import re
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from . import _process
from .errors import ClusterError, MinifcaError

INSTALL_HINT = "pip install -e '.[distributed]' (or pip install 'dask[distributed]')"
# Each worker runs one task at a time on one core: Numba's and the BLAS's pools are sized to it.
WORKER_THREADS = 1                  # tasks at a time per local worker
NUMBA_THREADS_PER_TASK = 1
WORKER_ENV = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
CONNECT_TIMEOUT_S = 30


@dataclass(frozen=True)
class ModelRef:
    """What a worker needs to load the client's model: its folder, its backend, and a stamp of the files
    (name, size, mtime) so that a checkpoint rewritten in place is loaded again, not served from the cache."""
    path: str
    backend: str
    stamp: tuple

    @classmethod
    def of(cls, model) -> ModelRef:
        folder = Path(model.path)
        files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        return cls(str(folder), model.backend, tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))


# ---------------------------------------------------------------- on a worker

_models: dict = {}                  # ModelRef -> Model, this process's loaded checkpoints
_loads: list = []                   # the ModelRefs loaded by this process, in order (tests read it)
_malloc_set: list = []              # whether this worker process set glibc's thresholds (tests read it)
_lock = threading.Lock()


def worker_model(ref: ModelRef):
    """The model `ref` names, loaded the first time a task of this process asks for it."""
    with _lock:
        model = _models.get(ref)
        if model is None:
            from .model import from_pretrained
            if not _loads:
                # Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which switches minifca's mallopt
                # off (_process.py). Set glibc's thresholds here, at run time, as every other minifca process has
                # them (BENCHMARKS.md, "Dask cluster").
                _malloc_set.append(_process.set_malloc_thresholds(over_env=True))
            try:
                model = from_pretrained(ref.path, backend=ref.backend)
            except MinifcaError as e:             # e.g. the checkpoint is not at that path on this machine
                raise type(e)(f"on worker {_worker_name()}: {e}") from None
            for old in [r for r in _models if (r.path, r.backend) == (ref.path, ref.backend)]:
                del _models[old]                  # rewritten since: the old weights are not needed again
            _models[ref] = model
            _loads.append(ref)
        return model


def _worker_name():
    try:
        from distributed import get_worker
        return get_worker().address
    except (ImportError, ValueError):
        return f"pid {os.getpid()}"


def loads():
    """The checkpoints this process has loaded for tasks, in order (a worker's record, for tests)."""
    return [(r.path, r.backend) for r in _loads]


def malloc_set():
    """Whether this process set glibc's malloc thresholds when it loaded its first model (a worker's record)."""
    return list(_malloc_set)


def _on_worker(fn, ref, *args):
    """A task as a worker runs it: the cached model, Numba at one thread per task thread, then fn."""
    model = worker_model(ref)
    if ref.backend == "numba":
        import numba
        numba.set_num_threads(NUMBA_THREADS_PER_TASK)  # Numba's setting is per thread: each task thread gets one core
    return fn(model, *args)


# ---------------------------------------------------------------- runners


class Serial:
    """Runs every task here, in order."""
    workers = 1

    def share(self, obj):
        return obj

    def map(self, fn, model, tasks):
        for i, args in enumerate(tasks):
            yield i, fn(model, *args)

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class DaskRunner(Serial):
    """Runs tasks on a Dask cluster's workers, each loading a model once (`worker_model`)."""

    def __init__(self, client, cluster=None):
        self.client, self.cluster = client, cluster

    @property
    def workers(self) -> int:
        """Task slots: the cluster's worker threads (at least 1)."""
        return max(1, sum(self.client.nthreads().values()))

    def share(self, obj):
        """A future of obj held on the workers. A task, not a scatter: if every worker holding it dies, the
        scheduler makes it again from the task instead of losing it."""
        return self.client.submit(_same, obj, pure=False, key=f"minifca-data-{uuid.uuid4().hex}")

    def map(self, fn, model, tasks):
        """Submits every task now (so that a job can submit its next tasks before it collects these) and
        returns the generator of their results as they finish."""
        ref, job = ModelRef.of(model), uuid.uuid4().hex[:8]
        futures = [self.client.submit(_on_worker, fn, ref, *args, pure=False, key=f"{fn.__name__}-{job}-{i}")
                   for i, args in enumerate(tasks)]
        return self._as_completed(futures)

    def _as_completed(self, futures):
        from distributed import as_completed
        index = {f.key: i for i, f in enumerate(futures)}
        try:
            for fut in as_completed(futures):
                yield index[fut.key], fut.result()
                fut.release()
        finally:                                       # stopped early (an error, ^C): nothing left running
            self.client.cancel(futures)

    def close(self):
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def _same(obj):
    return obj


LOCAL = re.compile(r"local:(\d+)")


def connect(spec: str, dashboard=False) -> DaskRunner:
    """A runner on the cluster `spec`: 'local:N' (a LocalCluster of N single-threaded worker processes, closed
    with the runner) or a scheduler's address ('tcp://host:8786', 'host:8786')."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ClusterError(f"--cluster {spec}: running on a cluster needs dask.distributed: {INSTALL_HINT}") from None
    m = LOCAL.fullmatch(spec.strip())
    if spec.strip().startswith("local") and (m is None or int(m.group(1)) < 1):
        raise ClusterError(f"--cluster {spec}: write local:N with N >= 1 worker processes (e.g. local:2)")
    if m is not None:
        cluster = LocalCluster(n_workers=int(m.group(1)), threads_per_worker=WORKER_THREADS, processes=True,
                               env=WORKER_ENV, dashboard_address=":0" if dashboard else None,
                               scheduler_kwargs={"dashboard": dashboard})
        try:
            return DaskRunner(Client(cluster), cluster)
        except BaseException:
            cluster.close()
            raise
    address = spec.strip() if "://" in spec else f"tcp://{spec.strip()}"
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as e:
        raise ClusterError(f"--cluster {spec}: no Dask scheduler answered at {address} within {CONNECT_TIMEOUT_S} s "
                           f"({type(e).__name__}: {e}); start one with `dask scheduler` and workers with "
                           f"`dask worker {address} --nthreads 1`") from None
    try:
        client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
    except TimeoutError:
        client.close()
        raise ClusterError(f"--cluster {spec}: the scheduler at {address} has no workers after {CONNECT_TIMEOUT_S} s; "
                           f"start some with `dask worker {address} --nthreads 1`") from None
    return DaskRunner(client)
