"""Do the weights' memory reads slow the products down? 12 layers' distinct bert-base-shaped weights
(340 MiB, streamed from memory) against one layer's weights 12 times (in cache), at 128 / 64 / 32 rows,
through `kernels/cpu._linear`; best of 5. Also the read bandwidth of one pass over 340 MiB.
Usage: python benchmarks/gemm_streamed.py
"""
import time

import numpy as np

from minifca.kernels.cpu import _linear
from minifca.bench import best_ms

rng = np.random.default_rng(0)
shapes = [(768, 768)] * 4 + [(3072, 768), (768, 3072)]
layers = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(12)]
bias = {n: np.zeros(n, np.float32) for n in (768, 3072)}


def run(rows, distinct):
    xs = {k: rng.normal(size=(rows, k)).astype(np.float32) for k in (768, 3072)}
    return best_ms(lambda: [_linear(xs[w.shape[1]], w, bias[w.shape[0]]) for layer in range(12) for w in layers[layer if distinct else 0]], 5)


for rows in (128, 64, 32):
    streamed, cached = run(rows, True), run(rows, False)
    gflop = 12 * 2 * rows * sum(a * b for a, b in shapes) / 1e9
    print(f"{rows} rows: distinct weights {streamed:.1f} ms ({gflop / streamed * 1e3:.0f} GFLOP/s), "
          f"one layer's weights 12 times {cached:.1f} ms ({gflop / cached * 1e3:.0f} GFLOP/s)")
a = np.ones(340 * 2**18, np.float32)
t = time.perf_counter()
a.sum()
print(f"read bandwidth, one pass over 340 MiB: {340 / 1024 / (time.perf_counter() - t):.1f} GiB/s")
