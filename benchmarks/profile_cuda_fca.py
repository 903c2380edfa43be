"""Host-side profile (cProfile) of the cuda backend's forward, full and FCA keep 0.5, on a random
MiniLM-L6-shaped and bert-base-shaped checkpoint. Usage on a GPU machine:
python benchmarks/profile_cuda_fca.py WEIGHTS_DIR   (checkpoints written there by minifca bench)
"""
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import numpy as np

import minifca
from minifca import bench
from minifca.fca import FCAConfig

root = Path(sys.argv[1] if len(sys.argv) > 1 else "weights/bench")
for name, (B, L) in [("minilm-l6", (1, 128)), ("bert-base", (32, 64))]:
    folder = bench.ensure_checkpoint(root, name, bench.MODELS[name])
    model = minifca.from_pretrained(folder, backend="cuda")
    ids = bench.random_ids(B, L, model.config.vocab_size)
    for label, fca in (("full", None), ("FCA keep 0.5", FCAConfig(keep=0.5))):
        for _ in range(3):
            model.forward(ids, fca=fca)
        t = time.perf_counter()
        for _ in range(10):
            model.forward(ids, fca=fca)
        ms = (time.perf_counter() - t) * 100
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(10):
            model.forward(ids, fca=fca)
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18)
        print(f"==== {name} {B}x{L} {label}: {ms:.2f} ms per forward (mean of 10)\n" + s.getvalue()[-4500:], flush=True)
