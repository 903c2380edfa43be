"""FCA forwards with and without `FCAState.leaves_alone` (a layer whose reduction would return its batch as it is
runs without attention statistics or a reduce), interleaved in one process, at the bench's uniform keeps that halve
and third the FLOPs (after their one cut, every later layer is such a layer).

    python benchmarks/ab_fca_idle_layers.py [--models minilm-l6 bert-base] [--shapes 1x128 8x128] [--runs 15]

Uses the bench's random checkpoints (weights/bench/, written by `minifca bench`). "reduced" makes leaves_alone say
no, so every layer from the cut on computes statistics and reduces, as before the change; the outputs of the two
are asserted bit-identical. Prints median ms of each, their ratio, and FCA's speedup x FLOPs ratio both ways
against the full forward timed in the same rounds. For figures, unset the OpenBLAS overrides in the command alone:
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/ab_fca_idle_layers.py
"""
import minifca  # noqa: I001  (first, as users import it)
import argparse
import time
from pathlib import Path

import numpy as np

from minifca import bench, fca as F


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["minilm-l6", "bert-base"])
    ap.add_argument("--shapes", nargs="+", default=["1x128", "8x128"])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--weights", default="weights/bench")
    a = ap.parse_args()
    skip = F.FCAState.leaves_alone
    for name in a.models:
        folder = bench.ensure_checkpoint(Path(a.weights), name, bench.MODELS[name])
        model = minifca.from_pretrained(folder, backend="numba")
        for shape in a.shapes:
            B, L = (int(v) for v in shape.split("x"))
            ids = bench.random_ids(B, L, model.config.vocab_size)
            for target, fraction in bench.FCA_TARGETS.items():
                keep, flops = bench.fca_keep_for(model, L, fraction)
                cfg = F.FCAConfig(keep=keep)
                runs = {"full": (skip, None), "skipped": (skip, cfg), "reduced": (lambda self, *x: False, cfg)}
                times, outs = {k: [] for k in runs}, {}
                for k, (rule, c) in runs.items():
                    F.FCAState.leaves_alone = rule
                    outs[k] = model.forward(ids, fca=c).last_hidden_state
                assert np.array_equal(outs["skipped"], outs["reduced"])
                for r in range(a.runs):
                    for k in (list(runs) if r % 2 else list(runs)[::-1]):
                        F.FCAState.leaves_alone, c = runs[k]
                        t = time.perf_counter()
                        model.forward(ids, fca=c)
                        times[k].append(time.perf_counter() - t)
                F.FCAState.leaves_alone = skip
                full, s, red = (float(np.median(times[k])) * 1e3 for k in ("full", "skipped", "reduced"))
                print(f"{name} {shape} FCA {target} (keep {keep:.3f}, FLOPs {flops:.3f}): full {full:.1f} ms, "
                      f"reduced {red:.1f} ms, skipped {s:.1f} ms: {red / s:.3f}x; speedup x FLOPs "
                      f"{full / red * flops:.2f} -> {full / s * flops:.2f}", flush=True)


if __name__ == "__main__":
    main()
