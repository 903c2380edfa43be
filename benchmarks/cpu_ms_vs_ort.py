"""minifca's numba forward (full, and FCA at the keep that halves the FLOPs) against ONNX Runtime, on ONE thread, timed
by the CPU time each call uses, in one process, calls interleaved: a comparison that a loaded machine cannot skew
by preempting a call (the wall clock of `minifca bench` can: 2-thread products wait for both threads to be
scheduled). One thread is not two: this is the single-core side of `minifca bench`, not a replacement for it.

Prints per model and shape: CPU ms per forward for numba, ORT and numba with FCA (best of --runs), numba/ORT time ratio
(ORT ms / numba ms: >= 1 means numba is ahead), FCA's speedup, its FLOPs ratio and efficiency (speedup x FLOPs ratio).
Also the BLAS in use (the kernel OpenBLAS picked) and any OPENBLAS_CORETYPE override.
Usage, from the repository root (env -u keeps OpenBLAS's own kernel choice):
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/cpu_ms_vs_ort.py [--runs 7]
"""
import argparse
import os
import sys
import time
from pathlib import Path

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

import minifca  # noqa: E402
from minifca import FCAConfig, bench  # noqa: E402


def cpu_ms(f):
    t = time.process_time()
    f()
    return (time.process_time() - t) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--models", default="bert-base,minilm-l6")
    a = ap.parse_args()
    info = bench.blas_info()
    print(bench.blas_line(info), "|", bench.override_warning(info) or "no OPENBLAS_CORETYPE override")
    print(f"one thread, best CPU ms of {a.runs} interleaved calls; load average {os.getloadavg()[0]:.1f} at start")
    print(f"{'model':10s} {'shape':>6s} {'numba':>8s} {'ORT':>8s} {'ORT/numba':>9s} {'FCA':>8s} {'speedup':>7s} "
          f"{'FLOPs':>5s} {'eff.':>5s}")
    for name in a.models.split(","):
        folder = bench.ensure_checkpoint(Path("weights/bench"), name, bench.MODELS[name])
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = so.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(bench.export_onnx(folder)), so, providers=["CPUExecutionProvider"])
        model = minifca.from_pretrained(folder, backend="numba")
        for B, L in bench.SHAPES:
            ids = bench.random_ids(B, L, model.config.vocab_size)
            keep, flops_ratio = bench.fca_keep_for(model, L, bench.FCA_TARGETS["half"])
            fca = FCAConfig(keep=keep)
            feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones_like(ids, np.int64)}
            calls = {"numba": lambda: model.forward(ids), "ort": lambda: sess.run(None, feed),
                     "fca": lambda: model.forward(ids, fca=fca)}
            for f in calls.values():
                f()
            best = {k: min(cpu_ms(f) for _ in range(1)) for k, f in calls.items()}
            for _ in range(a.runs - 1):
                for k, f in calls.items():
                    best[k] = min(best[k], cpu_ms(f))
            speedup = best["numba"] / best["fca"]
            print(f"{name:10s} {B:>3d}x{L:<3d} {best['numba']:8.1f} {best['ort']:8.1f} {best['ort'] / best['numba']:8.2f}x "
                  f"{best['fca']:8.1f} {speedup:6.2f}x {flops_ratio:5.2f} {speedup * flops_ratio:5.2f}", flush=True)


if __name__ == "__main__":
    main()
