"""Where a numba forward's time goes, kernel by kernel, with the Python between them: full, FCA half, FCA third.

    python benchmarks/profile_kernels.py [--model minilm-l6] [--shape 1x128] [--runs 40]

Every compiled kernel `kernels.cpu` calls (`_linear_rows`, `_attend`, the LayerNorm, activation, embedding and FCA
loops, `_blocks`) is wrapped with a clock; "glue" is the forward's wall time less the kernels', i.e. the Python and
NumPy between them (the wrappers' own ~1 us per call included). Medians over --runs forwards (the glue's minimum
too), on the bench's random checkpoint (weights/bench/, written by `minifca bench`). For figures, unset the OpenBLAS
overrides in the command alone:
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/profile_kernels.py
"""
import minifca  # noqa: F401, I001  (first, as users import it)
import argparse
import time
from pathlib import Path

import numpy as np

from minifca import bench
from minifca.fca import FCAConfig
from minifca.kernels import cpu

KERNELS = ["_linear_rows", "_attend", "_add_layer_norm_rows", "_act_rows", "_embed_rows", "_stats_from_abar",
           "_reduce_rows", "_blocks", "_layer_norm_rows"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm-l6", choices=list(bench.MODELS))
    ap.add_argument("--shape", default="1x128")
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--weights", default="weights/bench")
    a = ap.parse_args()
    B, L = (int(v) for v in a.shape.split("x"))
    folder = bench.ensure_checkpoint(Path(a.weights), a.model, bench.MODELS[a.model])
    make, model = bench._runner("numba", folder, None)
    spent = {}

    def timed(fn, name):
        def run(*args):
            t = time.perf_counter()
            try:
                return fn(*args)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
        return run
    for name in KERNELS:
        setattr(cpu, name, timed(getattr(cpu, name), name))
    full = None
    for label, target in (("full", None), ("FCA half", 1 / 2), ("FCA third", 1 / 3)):
        keep, flops = bench.fca_keep_for(model, L, target) if target else (None, 1.0)
        fn = make(B, L, FCAConfig(keep=keep) if target else None)
        fn(), fn()
        rows = []
        for _ in range(a.runs):
            spent.clear()
            t = time.perf_counter()
            fn()
            rows.append(dict(spent, total=time.perf_counter() - t))
        med = {k: float(np.median([r.get(k, 0.0) for r in rows])) * 1e3 for k in rows[0]}
        glue = [(r["total"] - sum(v for k, v in r.items() if k != "total")) * 1e3 for r in rows]
        full = med["total"] if full is None else full
        parts = ", ".join(f"{k} {v:.2f}" for k, v in med.items() if k != "total")
        print(f"{a.model} {a.shape} {label}: {med['total']:.2f} ms (FLOPs {flops:.3f}, speedup x FLOPs "
              f"{full / med['total'] * flops:.2f}) = {parts}; glue median {np.median(glue):.2f}, min {min(glue):.2f}",
              flush=True)


if __name__ == "__main__":
    main()
