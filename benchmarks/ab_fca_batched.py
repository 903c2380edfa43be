"""FCA forward with the batched decisions (`FCAState._reduce_batched`) against the per-sequence loop.

all-MiniLM-L6-v2 (the pip-shipped default), 32 x 64 random ids, rows 16..31 padded after 40 tokens,
keep 0.5; the loop is forced through `fca.batchable`. Best of 5 each. Usage: python benchmarks/ab_fca_batched.py
"""
import numpy as np

import minifca
from minifca import fca as F
from minifca.assets import default_model_path
from minifca.bench import best_ms

model = minifca.from_pretrained(default_model_path(), backend="numba")
rng = np.random.default_rng(0)
ids = rng.integers(1000, 20000, (32, 64))
ids[:, 0] = 101
mask = np.ones_like(ids)
mask[16:, 40:] = 0
cfg = F.FCAConfig(keep=0.5)


full = best_ms(lambda: model.forward(ids, mask), 5)
batched = best_ms(lambda: model.forward(ids, mask, fca=cfg), 5)
batchable, F.batchable = F.batchable, lambda c: False
loop = best_ms(lambda: model.forward(ids, mask, fca=cfg), 5)
F.batchable = batchable
print(f"full {full:.1f} ms; FCA keep 0.5: batched decisions {batched:.1f} ms, per-sequence loop {loop:.1f} ms")
