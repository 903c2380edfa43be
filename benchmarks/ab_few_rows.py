"""A/B of kernels.cpu.FEW_ROWS (w @ x^T for few rows) on random bert-base / MiniLM-L6 checkpoints.

Both variants alternate run by run in one process (this VM's timings drift by up to 35% between
minutes); medians of 25. Usage, from the repository root: python benchmarks/ab_few_rows.py minilm-l6
"""
import sys
import time
from pathlib import Path

import numpy as np

import minifca
from minifca import bench
from minifca.fca import FCAConfig
from minifca.kernels import cpu

name = sys.argv[1] if len(sys.argv) > 1 else "minilm-l6"
folder = bench.ensure_checkpoint(Path("weights/bench"), name, bench.MODELS[name])
model = minifca.from_pretrained(folder, backend="numba")
VARIANTS = ((0, -1), cpu.FEW_ROWS)                                   # never, the default range


def ab(f, n=25):
    times = [[], []]
    for v in VARIANTS:
        cpu.FEW_ROWS = v
        f()
    for _ in range(n):
        for j, v in enumerate(VARIANTS):
            cpu.FEW_ROWS = v
            t = time.perf_counter()
            f()
            times[j].append(time.perf_counter() - t)
    return [float(np.median(t)) * 1e3 for t in times]


for B, L in [(1, 128), (1, 32)]:
    ids = bench.random_ids(B, L, model.config.vocab_size)
    a, b = ab(lambda: model.forward(ids))
    print(f"{name} {B}x{L} full: x @ w^T always {a:.1f} ms, w @ x^T for few rows {b:.1f} ms ({a / b:.2f}x)")
    for target in (1 / 2, 1 / 3):
        keep, fl = bench.fca_keep_for(model, L, target)
        c, d = ab(lambda: model.forward(ids, fca=FCAConfig(keep=keep)))
        print(f"   FCA keep {keep:.3f} (FLOPs {fl:.2f}): {c:.1f} ms (speedup x FLOPs {a / c * fl:.2f}) -> "
              f"{d:.1f} ms ({b / d * fl:.2f})", flush=True)
