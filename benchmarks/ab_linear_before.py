"""`kernels.cpu._linear` (the weight products) against the same function at an earlier commit, interleaved in one
process, at the MiniLM and bert-base weight shapes and the row counts a forward makes (1-512).

    python benchmarks/ab_linear_before.py [--before 2ee6d2b] [--reps 12]

The earlier kernels/cpu.py is read from the git history into a temporary file and imported as a module of
minifca.kernels (so its relative imports resolve), beside the current one. The weights are cycled through ~100 MB
of read-only copies (laid out once by each module), so they come from memory as in a forward; the two alternate
call by call. Prints GFLOP/s before / after and after / before per shape and row count. Default --before: the
commit before the 1-5 row tail tiles (4e30a52). For figures, unset the OpenBLAS overrides in the command alone:
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/ab_linear_before.py
"""
import minifca  # noqa: F401, I001  (first, as users import it)
import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from minifca.kernels import cpu

SHAPES = [(384, 384), (1536, 384), (384, 1536), (768, 768), (3072, 768), (768, 3072)]   # [out, in]
ROWS = (1, 3, 8, 39, 64, 128, 512)


def kernels_at(commit, tmp):
    """minifca/kernels/cpu.py at `commit`, imported as a module of minifca.kernels from a file in tmp."""
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "show", f"{commit}:minifca/kernels/cpu.py"], cwd=root, capture_output=True,
                         text=True, check=True).stdout
    name = "cpu_" + "".join(c if c.isalnum() else "_" for c in commit)  # e.g. c95a79f^ -> cpu_c95a79f_
    path = Path(tmp) / f"{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"minifca.kernels.{name}", path)
    mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)   # (its dataclasses look it up there)
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="2ee6d2b")
    ap.add_argument("--reps", type=int, default=12)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        old = kernels_at(a.before, tmp)
        print(f"GFLOP/s at {a.before} / now, and now / {a.before}, by rows")
        for N, K in SHAPES:
            copies = max(2, int(100e6 // (N * K * 4)))
            ws = [rng.standard_normal((N, K)).astype(np.float32) for _ in range(copies)]
            for w in ws:
                w.flags.writeable = False
                old._laid_out(w), cpu._laid_out(w)
            b = rng.standard_normal(N).astype(np.float32)
            cells = []
            for R in ROWS:
                x = rng.standard_normal((R, K)).astype(np.float32)
                times, i = {"before": [], "now": []}, 0
                for rep in range(a.reps):
                    order = (("before", old._linear), ("now", cpu._linear))
                    for name, f in order if rep % 2 else order[::-1]:
                        t = time.perf_counter()
                        f(x, ws[i % copies], b)
                        times[name].append(time.perf_counter() - t)
                        i += 1
                tb, tn = (float(np.median(times[k])) for k in ("before", "now"))
                cells.append(f"{R}: {2 * R * N * K / tb / 1e9:.0f}/{2 * R * N * K / tn / 1e9:.0f} {tb / tn:.2f}x")
            print(f"{N}x{K}  " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
