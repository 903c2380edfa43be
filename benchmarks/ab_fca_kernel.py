"""FCA forward with the compiled reduction (`kernels/cpu.reduce_batch`) against the NumPy one (`fca.reduce_batch`).

all-MiniLM-L6-v2 (the pip-shipped default), random ids, keep 0.5 (weighted) at (batch, length) = (1, 128),
(8, 128), (32, 64); both variants interleaved, best of 7 each, plus the reduction alone on one layer's
shapes. Usage: OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python benchmarks/ab_fca_kernel.py
"""
import numpy as np

import minifca
from minifca import fca as F
from minifca.assets import default_model_path
from minifca.kernels import cpu
from minifca.bench import best_ms

model = minifca.from_pretrained(default_model_path(), backend="numba")
cfg = F.FCAConfig(keep=0.5)
compiled = cpu.reduce_batch
for B, L in [(1, 128), (8, 128), (32, 64)]:
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, (B, L))
    ids[:, 0] = 101
    full = best_ms(lambda: model.forward(ids), 7)
    times = {"numba": [], "numpy": []}
    for _ in range(3):                                               # interleaved: the VM drifts
        for name, fn in (("numba", compiled), ("numpy", None)):
            if fn is None:
                del cpu.reduce_batch                                 # FCAState falls back to fca.reduce_batch
            times[name].append(best_ms(lambda: model.forward(ids, fca=cfg), 3))
            cpu.reduce_batch = compiled
    H = model.config.hidden_size
    x = rng.normal(size=(B, L, H)).astype(np.float32)
    valid = np.ones((B, L), bool)
    s = rng.random((B, L))
    plan = F.batch_plan(cfg, 0, valid.sum(1), valid)
    args = (s, x, valid.astype(np.float32), valid, plan.k, plan.c, plan.active, "weighted")
    one_numba, one_numpy = best_ms(lambda: compiled(*args), 20), best_ms(lambda: F.reduce_batch(*args), 20)
    print(f"{B}x{L}: full {full:.1f} ms; FCA keep 0.5 with reduce_batch numba {min(times['numba']):.1f} ms, "
          f"numpy {min(times['numpy']):.1f} ms; one reduction alone: numba {one_numba:.3f} ms, numpy {one_numpy:.3f} ms")
