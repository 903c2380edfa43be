"""The numba attention kernel before and after its products moved into `_panel_tile` register tiles (commit
c95a79f), interleaved in one process, on Q, K, V of the bench shapes (no mask, no probabilities, no statistics).

    python benchmarks/ab_attention_tiles.py [--rounds 25] [--before COMMIT]

"before" is `_attend` as it was at c95a79f^ (blocks of 4 query rows; logits as row updates q_c K^T[c, :], p V four
keys at a time), its module read from the git history and imported beside the current one
(`ab_linear_before.kernels_at`); "after" is kernels.cpu._attend. Prints the median ms of each and before / after,
and the largest difference between their outputs.
For figures, unset this machine's OpenBLAS overrides in the command alone:
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/ab_attention_tiles.py
"""
import minifca  # noqa: F401, I001  (first, as users import it)
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from minifca.kernels import cpu

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_linear_before import kernels_at  # noqa: E402  (a sibling script)

SHAPES = [(1, 128, 384), (8, 128, 384), (32, 64, 384), (1, 62, 384), (1, 39, 384), (1, 128, 768), (8, 128, 768)]  # B, n, H
N_HEAD = 12


def compare(old, rounds):
    """old: kernels/cpu.py at the earlier commit, as a module (its own `_attend` and `_blocks`)."""
    rng = np.random.default_rng(0)
    print(f"{'B x n, H':>14s} {'before ms':>10s} {'after ms':>9s} {'ratio':>6s} {'max |diff|':>11s}")
    for B, n, H in SHAPES:
        T = B * n
        Q, K, V = (rng.standard_normal((T, H)).astype(np.float32) for _ in range(3))
        bias, start = np.zeros(T, np.float32), np.arange(B + 1, dtype=np.int64) * n
        none4, none3 = np.zeros((1, 1, 1, 1), np.float32), np.zeros((1, 1, 1), np.float32)
        out = {k: np.empty((T, H), np.float32) for k in ("before", "after")}
        runs = {k: (lambda mod=mod, k=k: mod._attend(Q, K, V, bias, start, *mod._blocks(start), N_HEAD, False, False,
                                                     none4, none3, out[k]))
                for k, mod in (("before", old), ("after", cpu))}
        times = {k: [] for k in runs}
        for f in runs.values():
            f()
        for r in range(rounds):
            for k in (("before", "after") if r % 2 else ("after", "before")):
                t = time.perf_counter()
                runs[k]()
                times[k].append(time.perf_counter() - t)
        tb, ta = (float(np.median(times[k])) * 1e3 for k in ("before", "after"))
        diff = float(np.abs(out["before"] - out["after"]).max())
        print(f"{f'{B} x {n}, {H}':>14s} {tb:10.3f} {ta:9.3f} {tb / ta:5.2f}x {diff:11.1e}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--before", default="c95a79f^", help="the commit whose _attend is 'before' (default: c95a79f^)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        compare(kernels_at(a.before, tmp), a.rounds)


if __name__ == "__main__":
    main()
