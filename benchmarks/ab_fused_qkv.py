"""One fused Q/K/V product per layer (x @ [Wq; Wk; Wv]^T) against three products, the way kernels/cpu.attention
makes them (`_linear`: bias added, C-contiguous [R, H] each), at the bench shapes. Best of n, interleaved rounds,
of the wall clock and of the CPU time the process used (all threads: on a loaded machine a call can be
preempted in every one of n tries, and its CPU time is then the steadier figure; run with OPENBLAS_NUM_THREADS=1
for a one-core comparison that preemption cannot touch).

Usage, from the repository root: python benchmarks/ab_fused_qkv.py [--n 20] [--rounds 3]
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import time  # noqa: E402

from minifca.bench import best_ms  # noqa: E402

from minifca.kernels import cpu  # noqa: E402

SHAPES = {"bert-base": 768, "minilm-l6": 384}
ROWS = {"1x128": 128, "8x128": 1024, "32x64": 2048, "FCA half 1x128": 62}


def three(x2, ws, bs):
    return [cpu._linear(x2, w, b) for w, b in zip(ws, bs)]


def fused(x2, w, b):
    y = cpu._linear(x2, w, b)                                        # [R, 3H]
    return np.split(y, 3, axis=1)                                    # three [R, H] views (row stride 3H)


def best_cpu_ms(f, n):
    f()
    best = float("inf")
    for _ in range(n):
        t = time.process_time()
        f()
        best = min(best, time.process_time() - t)
    return best * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'model':10s} {'rows':>15s} {'wall: 3 products':>16s} {'fused':>8s} {'ratio':>6s}"
          f" {'cpu: 3 products':>16s} {'fused':>8s} {'ratio':>6s}")
    for rnd in range(a.rounds):
        for name, H in SHAPES.items():
            ws = [rng.standard_normal((H, H)).astype(np.float32) for _ in range(3)]
            bs = [rng.standard_normal(H).astype(np.float32) for _ in range(3)]
            w, b = np.concatenate(ws), np.concatenate(bs)
            for label, R in ROWS.items():
                x2 = rng.standard_normal((R, H)).astype(np.float32)
                ref, got = three(x2, ws, bs), fused(x2, w, b)
                assert all(np.allclose(r, g, rtol=1e-4, atol=1e-3) for r, g in zip(ref, got))
                t3, tf = best_ms(lambda: three(x2, ws, bs), a.n), best_ms(lambda: fused(x2, w, b), a.n)
                c3, cf = best_cpu_ms(lambda: three(x2, ws, bs), a.n), best_cpu_ms(lambda: fused(x2, w, b), a.n)
                print(f"{name:10s} {label:>15s} {t3:14.2f}ms {tf:6.2f}ms {t3 / tf:5.2f}x {c3:14.2f}ms {cf:6.2f}ms "
                      f"{c3 / cf:5.2f}x  (round {rnd + 1})", flush=True)


if __name__ == "__main__":
    main()
