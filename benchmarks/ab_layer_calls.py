"""A numba forward with the kernels of an earlier commit and with today's, interleaved in one process: full, FCA
half and FCA third (uniform keeps at those FLOPs ratios), at the bench's shapes.

    python benchmarks/ab_layer_calls.py [--before COMMIT] [--model minilm-l6] [--rounds 41]

"before" is the model with `model.ops` = minifca/kernels/cpu.py at --before (read from git and imported beside
the current module: `ab_linear_before.kernels_at`), "after" the same model with today's `kernels.cpu`; the same
ids, forward by forward in alternating order. Prints the median ms of each, before / after, FCA's speedup x FLOPs
for each, and the largest difference between their last hidden states. For figures, unset the OpenBLAS overrides
in the command alone:
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/ab_layer_calls.py
"""
import minifca  # noqa: F401, I001  (first, as users import it)
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from minifca import bench
from minifca.fca import FCAConfig
from minifca.kernels import cpu

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_linear_before import kernels_at  # noqa: E402  (a sibling script)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="HEAD")
    ap.add_argument("--model", default="minilm-l6", choices=list(bench.MODELS))
    ap.add_argument("--shapes", default="1x128,8x128,32x64")
    ap.add_argument("--rounds", type=int, default=41)
    ap.add_argument("--weights", default="weights/bench")
    a = ap.parse_args()
    folder = bench.ensure_checkpoint(Path(a.weights), a.model, bench.MODELS[a.model])
    _, model = bench._runner("numba", folder, None)
    with tempfile.TemporaryDirectory() as tmp:
        mods = {"before": kernels_at(a.before, tmp), "after": cpu}
        print(f"{a.model}: kernels at {a.before} (before) and now (after); median ms of {a.rounds} forwards each")
        for shape in a.shapes.split(","):
            B, L = (int(v) for v in shape.split("x"))
            ids = bench.random_ids(B, L, model.config.vocab_size)
            full = {}
            for label, target in (("full", None), ("FCA half", 1 / 2), ("FCA third", 1 / 3)):
                keep, flops = bench.fca_keep_for(model, L, target) if target else (None, 1.0)
                fca = FCAConfig(keep=keep) if target else None
                outs, times = {}, {k: [] for k in mods}

                def run(k):
                    model.ops = mods[k]
                    t = time.perf_counter()
                    outs[k] = model.forward(ids, fca=fca).last_hidden_state
                    return time.perf_counter() - t
                for k in mods:
                    run(k), run(k)
                for r in range(a.rounds):
                    for k in (("before", "after") if r % 2 else ("after", "before")):
                        times[k].append(run(k))
                ms = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
                full = full or ms
                sf = " ".join(f"{k} {full[k] / ms[k] * flops:.2f}" for k in mods) if target else ""
                diff = float(np.abs(outs["before"] - outs["after"]).max())
                print(f"{shape:>7s} {label:9s} before {ms['before']:7.2f} after {ms['after']:7.2f} "
                      f"ratio {ms['before'] / ms['after']:.3f}x  {'speedup x FLOPs ' + sf if sf else '':34s} "
                      f"max |diff| {diff:.1e}", flush=True)
        model.ops = cpu


if __name__ == "__main__":
    main()
