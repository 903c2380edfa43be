"""A/B: one MiniLM forward (32 SST-2 sentences) in this process, in a process spawned after a Dask cluster started,
and in a Dask worker, each with and without glibc's malloc thresholds set at run time.

Question: why did a 1-worker LocalCluster run the grid at a third of the serial speed? Dask's nanny sets
MALLOC_TRIM_THRESHOLD_=65536 before it spawns (and leaves it in the client's environment), and minifca's mallopt
stands down where that variable is set (_process.py). minifca.cluster now sets the thresholds in each worker when
it loads its first model; this script shows the difference. Best of 7 forwards after a warm-up, one thread
everywhere, the three places interleaved three times.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/ab_worker_malloc.py
"""
import os

for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = "1"


def forward_ms(set_thresholds, reps=7):
    import time
    from pathlib import Path

    import minifca
    from minifca import _process
    from minifca.data import load_data
    if set_thresholds:
        _process.set_malloc_thresholds(over_env=True)
    shared = Path(os.environ.get("MINIFCA_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    m = minifca.from_pretrained(shared / "models" / "minilm-l6-sst2", backend="numba")
    enc = m.tokenize(load_data(shared / "data" / "sst2" / "dev.tsv", limit=32).texts)
    m(enc)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        m(enc)
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def _child(q, set_thresholds):
    q.put(forward_ms(set_thresholds))


def main():
    import multiprocessing as mp

    from distributed import Client, LocalCluster
    ctx = mp.get_context("spawn")

    def spawned(set_thresholds):
        q = ctx.Queue()
        p = ctx.Process(target=_child, args=(q, set_thresholds))
        p.start()
        ms = q.get()
        p.join()
        return ms

    here = forward_ms(False)                      # minifca's mallopt ran at import, as it does for any user
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      scheduler_kwargs={"dashboard": False}) as cluster, Client(cluster) as client:
        a, b = list(client.nthreads())             # a fresh worker for each variant: the setting is per process
        print(f"MALLOC_TRIM_THRESHOLD_ in the client after the cluster started: "
              f"{os.environ.get('MALLOC_TRIM_THRESHOLD_')}")
        print(f"{'round':<7}{'this process':>14}{'spawned, as is':>16}{'spawned, set':>14}"
              f"{'worker, as is':>15}{'worker, set':>13}   (ms, best of 7)")
        for r in range(3):
            row = [here if r == 0 else forward_ms(False), spawned(False), spawned(True),
                   client.submit(forward_ms, False, pure=False, workers=[a]).result(),
                   client.submit(forward_ms, True, pure=False, workers=[b]).result()]
            print(f"{r + 1:<7}" + "".join(f"{v:>{w}.0f}" for v, w in zip(row, (14, 16, 14, 15, 13))))


if __name__ == "__main__":
    main()
