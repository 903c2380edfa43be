"""residual + LayerNorm (`kernels/cpu._add_layer_norm_rows`) compiled with and without reassociation of its
float64 sums (`_SUMS`), on 1 and 2 threads, at the row counts of batch 1 and batch 8 (hidden 384, 768);
both variants compiled here from the same Python function, alternating; best of 50 each.
Usage: python benchmarks/ab_ln_sums.py
"""
import numba as nb
import numpy as np

from minifca.kernels import cpu
from minifca.bench import best_ms

plain = nb.njit(parallel=True)(cpu._add_layer_norm_rows.py_func)
sums = nb.njit(parallel=True, fastmath=cpu._SUMS)(cpu._add_layer_norm_rows.py_func)


rng = np.random.default_rng(0)
for threads in (1, 2):
    nb.set_num_threads(threads)
    for R, H in [(128, 384), (1024, 384), (128, 768), (1024, 768)]:
        x, r = rng.normal(size=(R, H)).astype(np.float32), rng.normal(size=(R, H)).astype(np.float32)
        g, b = rng.normal(size=H).astype(np.float32), rng.normal(size=H).astype(np.float32)
        outs = [np.empty_like(x), np.empty_like(x)]
        t = [1e3 * best_ms(lambda: f(x, r, g, b, np.float32(1e-12), o), 50) for f, o in zip((plain, sums), outs)]
        diff = np.abs(outs[0] - outs[1]).max()
        print(f"{threads} thread(s), [{R}, {H}]: in order {t[0]:.1f} us, reassociated {t[1]:.1f} us "
              f"({t[0] / t[1]:.1f}x); max |difference| {diff:.1e}")
