"""Where batch-1 FCA loses time: the weight products inside a forward, full and FCA half.

Random-weight bert-base (`minifca bench` writes it to weights/bench/bert-base), 1 x 128 random ids; every
weight product (`kernels/cpu._xwt`) is timed inside the best of 5 forwards, and the same products are
then run back to back on fresh arrays of the same shapes. Prints the row counts the products ran on.
Usage: python benchmarks/gemm_in_forward.py [checkpoint folder]
"""
import collections
import sys
import time

import numpy as np

import minifca
from minifca import fca as F
from minifca.kernels import cpu

folder = sys.argv[1] if len(sys.argv) > 1 else "weights/bench/bert-base"
model = minifca.from_pretrained(folder, backend="numba")
rng = np.random.default_rng(0)
ids = rng.integers(1000, 20000, (1, 128))
ids[:, 0] = 101
plain, calls = cpu._xwt, []


def timed(x, w):
    t = time.perf_counter()
    y = plain(x, w)
    calls.append((x.shape[0], w.shape, time.perf_counter() - t))
    return y


for name, cfg in [("full", None), ("FCA keep 0.484", F.FCAConfig(keep=0.484))]:
    model.forward(ids, fca=cfg)
    best = float("inf")
    for _ in range(5):
        calls.clear()
        cpu._xwt = timed
        t = time.perf_counter()
        model.forward(ids, fca=cfg)
        total = time.perf_counter() - t
        cpu._xwt = plain
        if total < best:
            best, kept = total, list(calls)
    inside = sum(c[2] for c in kept)
    flops = sum(2 * r * w[0] * w[1] for r, w, _ in kept)
    arrays = [(rng.random((r, w[1]), np.float32), rng.random(w, np.float32)) for r, w, _ in kept]
    t = time.perf_counter()
    for x, w in arrays:
        plain(x, w)
    alone = time.perf_counter() - t
    rows = dict(collections.Counter(r for r, _, _ in kept))
    print(f"{name}: forward {best * 1e3:.1f} ms; {len(kept)} weight products {inside * 1e3:.1f} ms inside it "
          f"({flops / inside / 1e9:.0f} GFLOP/s), {alone * 1e3:.1f} ms back to back; rows per product {rows}")
