"""The numba forward with the encoder's linear weights laid out once for their product (`kernels/cpu.lay_out`,
what from_pretrained does) against the checkpoint's layout (memory-mapped [out, in], products as x @ w^T or, for
2-80 rows, w @ x^T), in one process, calls interleaved; full and FCA (the keep that halves the FLOPs).
Also the products alone at the row counts they see (8 to 2048 rows).

Timed by the CPU time each call uses, best of --runs, on --threads threads (default 1: on a loaded machine a
call's wall clock is the scheduler's; its CPU time on one thread is its own).
Usage, from the repository root: env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/ab_weight_layout.py
"""
import argparse
import os
import sys
import time
from pathlib import Path

ap = argparse.ArgumentParser()
ap.add_argument("--runs", type=int, default=7)
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--models", default="minilm-l6,bert-base")
a = ap.parse_args()
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(a.threads)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import minifca  # noqa: E402
from minifca import FCAConfig, bench  # noqa: E402
from minifca.kernels import cpu  # noqa: E402
from minifca.model import Model  # noqa: E402
from minifca.weights import find_weight_files, load_state, to_params  # noqa: E402


def cpu_ms(f):
    t = time.process_time()
    f()
    return (time.process_time() - t) * 1e3


def best(calls, runs):
    for f in calls.values():
        f()
    out = {k: float("inf") for k in calls}
    for _ in range(runs):
        for k, f in calls.items():
            out[k] = min(out[k], cpu_ms(f))
    return out


print(bench.blas_line(bench.blas_info()), f"| {a.threads} thread(s), best CPU ms of {a.runs}, load average "
      f"{os.getloadavg()[0]:.1f}")
rng = np.random.default_rng(0)
print("products alone, [R, in] @ [out, in]^T: checkpoint layout (as _xwt picks) vs laid out")
for out_, in_ in ((768, 768), (3072, 768), (768, 3072), (384, 384), (1536, 384)):
    w = rng.standard_normal((out_, in_)).astype(np.float32)
    wf = np.asfortranarray(w)
    for R in (8, 32, 62, 128, 1024, 2048):
        x = rng.standard_normal((R, in_)).astype(np.float32)
        t = best({"c": lambda: cpu._xwt(x, w), "f": lambda: cpu._xwt(x, wf)}, a.runs)
        print(f"  {out_:4d}x{in_:<4d} R={R:4d}: {t['c']:8.3f} {t['f']:8.3f} ms  {t['c'] / t['f']:5.2f}x", flush=True)

print(f"{'model':10s} {'shape':>6s} {'checkpoint':>10s} {'laid out':>9s} {'gain':>6s} | FCA half: {'checkpoint':>10s} "
      f"{'laid out':>9s} {'gain':>6s}")
for name in a.models.split(","):
    folder = bench.ensure_checkpoint(Path("weights/bench"), name, bench.MODELS[name])
    laid = minifca.from_pretrained(folder, backend="numba")
    cfg = laid.config
    plain = Model(cfg, to_params(load_state(find_weight_files(folder), cfg), cfg), None, backend="numba")
    assert laid.params["layers"][0]["ffn"]["i"]["w"].flags.f_contiguous
    assert plain.params["layers"][0]["ffn"]["i"]["w"].flags.c_contiguous
    for B, L in bench.SHAPES:
        ids = bench.random_ids(B, L, cfg.vocab_size)
        fca = FCAConfig(keep=bench.fca_keep_for(laid, L, bench.FCA_TARGETS["half"])[0])
        np.testing.assert_allclose(laid.forward(ids).last_hidden_state, plain.forward(ids).last_hidden_state,
                                   rtol=0, atol=1e-3)
        t = best({"c": lambda: plain.forward(ids), "f": lambda: laid.forward(ids),
                  "cf": lambda: plain.forward(ids, fca=fca), "ff": lambda: laid.forward(ids, fca=fca)}, a.runs)
        print(f"{name:10s} {B:>3d}x{L:<3d} {t['c']:10.1f} {t['f']:9.1f} {t['c'] / t['f']:5.2f}x | FCA half: "
              f"{t['cf']:10.1f} {t['ff']:9.1f} {t['cf'] / t['ff']:5.2f}x", flush=True)
