"""Forward times with and without minifca's malloc thresholds (`minifca/_process.py`), fresh processes.

Each (backend, setting) runs in its own process (`MINIFCA_MALLOPT=0` turns the setting off), two rounds,
random MiniLM-L6-shaped checkpoint from `minifca bench` (weights/bench/minilm-l6), medians of 5.
Usage, from the repository root: python benchmarks/ab_mallopt.py
"""
import os
import subprocess
import sys

CHILD = """
import minifca
from minifca import bench
m = minifca.from_pretrained("weights/bench/minilm-l6", backend="{backend}")
out = []
for B, L in [(1, 128), (8, 128), (32, 64)]:
    ids = bench.random_ids(B, L, m.config.vocab_size)
    out.append(f"{{B}}x{{L}} {{bench.median_ms(lambda: m.forward(ids), 5):.1f}} ms")
print(" | ".join(out))
"""

for rnd in (1, 2):
    for backend in ("numpy", "numba"):
        for setting in ("0", "1"):
            env = dict(os.environ, MINIFCA_MALLOPT=setting)
            r = subprocess.run([sys.executable, "-c", CHILD.format(backend=backend)], env=env, text=True,
                               capture_output=True, check=True)
            print(f"round {rnd} {backend:5s} MINIFCA_MALLOPT={setting}: {r.stdout.strip()}", flush=True)
