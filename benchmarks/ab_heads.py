"""The heads' products (pooler, classifier) in OpenBLAS against kernels.cpu.linear, in a program that imports NumPy
before minifca (as many do): OpenBLAS then reads its default OPENBLAS_THREAD_TIMEOUT, and its worker thread spins
~0.1 s after each product it shares, on the cores the next forward's Numba kernels want.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/ab_heads.py [--reps 7]

Random MiniLM-L6 and bert-base checkpoints from `minifca bench` (weights/bench/); forwards back to back, the two
variants alternating by block of --reps, medians in ms.
"""
import numpy as np  # noqa: I001  (first, on purpose: see above)
import argparse
import time

import minifca  # noqa: F401
from minifca import bench, reference
from minifca.kernels import cpu


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--weights", default="weights/bench")
    a = ap.parse_args()
    variants = {"heads in _linear_rows": cpu.linear, "heads in OpenBLAS": reference.linear}
    for name in ("minilm-l6", "bert-base"):
        make, _ = bench._runner("numba", f"{a.weights}/{name}", None)
        for B, L in bench.SHAPES:
            run = make(B, L)
            ts = {v: [] for v in variants}
            for _ in range(2):
                for v, fn in variants.items():
                    cpu.linear = fn
                    run()
                    for _ in range(a.reps):
                        t = time.perf_counter()
                        run()
                        ts[v].append(time.perf_counter() - t)
            cpu.linear = variants["heads in _linear_rows"]
            med = {v: float(np.median(x)) * 1e3 for v, x in ts.items()}
            print(f"{name} {B}x{L}: " + ", ".join(f"{v} {m:.1f} ms" for v, m in med.items())
                  + f"; OpenBLAS / _linear_rows {med['heads in OpenBLAS'] / med['heads in _linear_rows']:.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
