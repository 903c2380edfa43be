"""An ablation grid serially and on Dask LocalClusters of 1, 2, ... single-threaded workers: wall times side by side.

Question: what does the distributed path cost against the serial one on the same work (1 worker vs this process on
one thread), and how does the grid's wall time scale with workers? Each run writes a fresh output folder (no cache).
The serial run is this process at one thread (NUMBA/OMP/OPENBLAS_NUM_THREADS=1, set before minifca loads), the
workers one thread each; the cluster's start and a warm-up task (each worker loading the checkpoint and Numba's
cached kernels) are timed apart from the grid. All rows are checked equal to the serial run's.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/cluster_scaling.py [--examples 256] [--workers 1,2]
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"                                     # the serial run on one core, as each worker is

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MINIFCA_SHARED", ROOT.parent / "shared"))


def rows_of(folder):
    import csv
    with open(folder / "results.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "minilm-l6-sst2"))
    ap.add_argument("--data", default=str(SHARED / "data" / "sst2" / "dev.tsv"))
    ap.add_argument("--examples", type=int, default=256, help="first N examples of the data (default 256)")
    ap.add_argument("--batch-size", type=int, default=32, help="examples per batch = per task (default 32)")
    ap.add_argument("--keep", default="0.7,0.5,0.3", help="keep levels of the grid (default 0.7,0.5,0.3)")
    ap.add_argument("--workers", default="1,2", help="LocalCluster sizes to time (default 1,2)")
    args = ap.parse_args()

    import minifca
    from minifca import ablate as ab, cluster
    from minifca.data import load_data

    model = minifca.from_pretrained(args.model, backend="numba")
    data = load_data(args.data, limit=args.examples)
    levels = [float(v) for v in args.keep.split(",")]
    grid = ab.grid(model.config.num_hidden_layers, ["attention_received", "random"], ["drop", "weighted"], levels)
    batches = -(-len(data) // args.batch_size)
    tasks = (len(grid) + 1) * batches
    tmp = Path(tempfile.mkdtemp(prefix="cluster_scaling_"))
    quiet = lambda s: None

    def timed_grid(name, runner):
        out = tmp / name
        t = time.perf_counter()
        ab.ablate(model, data, grid, out, batch_size=args.batch_size, log=quiet, runner=runner)
        return time.perf_counter() - t, out

    ab.ablate(model, data.subset(range(args.batch_size)), grid[:1], tmp / "warm", batch_size=args.batch_size,
              log=quiet)                                      # this process's Numba kernels loaded, as the workers' are
    serial_s, serial_out = timed_grid("serial", None)
    results = [("serial (this process, 1 thread)", 0, 0.0, 0.0, serial_s)]
    for n in [int(v) for v in args.workers.split(",")]:
        t = time.perf_counter()
        runner = cluster.connect(f"local:{n}")
        start_s = time.perf_counter() - t
        try:
            t = time.perf_counter()                           # every worker loads the model: one task per worker
            warm = data.subset(range(min(len(data), args.batch_size * n)))
            ab.ablate(model, warm, grid[:1], tmp / f"warm{n}", batch_size=args.batch_size, log=quiet, runner=runner)
            warm_s = time.perf_counter() - t
            grid_s, out = timed_grid(f"local{n}", runner)
        finally:
            runner.close()
        if rows_of(out) != rows_of(serial_out):
            sys.exit(f"local:{n}: results differ from the serial run's")
        results.append((f"local:{n}", n, start_s, warm_s, grid_s))
    shutil.rmtree(tmp, ignore_errors=True)

    print(f"grid: {len(grid)} configurations + the full model, {len(data)} examples, batch {args.batch_size} "
          f"-> {tasks} tasks; {os.cpu_count()} cores; rows equal to the serial run's in every run")
    print(f"{'run':<34}{'start s':>9}{'warm-up s':>11}{'grid s':>9}{'vs serial':>11}{'vs 1 worker':>13}")
    one = next((r[4] for r in results if r[1] == 1), None)
    for name, n, start_s, warm_s, grid_s in results:
        vs1 = f"{one / grid_s:.2f}x" if n and one else ""
        print(f"{name:<34}{start_s:>9.1f}{warm_s:>11.1f}{grid_s:>9.1f}{serial_s / grid_s:>10.2f}x{vs1:>13}")
    print("vs serial / vs 1 worker: speed-up of the grid's wall time (above 1 = faster); start and warm-up are "
          "paid once per cluster")


if __name__ == "__main__":
    main()
