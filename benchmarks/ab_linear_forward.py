"""Whole numba forwards with the weight products in `_linear_rows` (as shipped) against the same forwards with
`kernels.cpu._linear` swapped for NumPy's BLAS (np.matmul(x, w.T) + b on the same C-order weights), alternating
in one process on the random bert-base / MiniLM-L6 checkpoints `minifca bench` writes (weights/bench/).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/ab_linear_forward.py [--reps 7] [--gap 0.12]

Each timed forward starts after a pause of --gap seconds, so neither variant starts while the other's thread pool
is still spinning (OpenBLAS's threads spin ~0.1 s after a product unless OPENBLAS_THREAD_TIMEOUT was set before
NumPy loaded): the pause makes it an A/B of the products, not of which pool was left awake. Medians, ms.
"""
import minifca  # noqa: I001  (first, as users import it: it sets OPENBLAS_THREAD_TIMEOUT before NumPy loads)
import argparse
import time

import numpy as np

from minifca import bench
from minifca.fca import FCAConfig
from minifca.kernels import cpu
from linear_rows import blas  # x @ w.T + b through NumPy's BLAS, as linear_rows.py times it


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--gap", type=float, default=0.12)
    ap.add_argument("--weights", default="weights/bench")
    a = ap.parse_args()
    variants = {"linear_rows": cpu._linear, "blas": blas}
    for name in ("minilm-l6", "bert-base"):
        make, model = bench._runner("numba", f"{a.weights}/{name}", None)
        for B, L in bench.SHAPES:
            cases = {"full": make(B, L)}
            if B == 1:
                for target in ("half", "third"):
                    keep = bench.fca_keep_for(model, L, bench.FCA_TARGETS[target])[0]
                    cases[f"FCA {target}"] = make(B, L, FCAConfig(keep=keep))
            for case, run in cases.items():
                ts = {v: [] for v in variants}
                for fn in variants.values():
                    cpu._linear = fn
                    run()
                for _ in range(a.reps):
                    for v, fn in variants.items():
                        cpu._linear = fn
                        time.sleep(a.gap)
                        t = time.perf_counter()
                        run()
                        ts[v].append(time.perf_counter() - t)
                cpu._linear = variants["linear_rows"]
                med = {v: float(np.median(x)) * 1e3 for v, x in ts.items()}
                print(f"{name} {B}x{L} {case}: linear_rows {med['linear_rows']:.1f} ms, blas {med['blas']:.1f} ms, "
                      f"blas / linear_rows {med['blas'] / med['linear_rows']:.2f}", flush=True)


if __name__ == "__main__":
    main()
