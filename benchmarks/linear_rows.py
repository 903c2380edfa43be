"""The weight products x @ w^T + b by row count: minifca's `_linear_rows` against NumPy's BLAS, side by side.

    python benchmarks/linear_rows.py [--threads 1,2] [--rows 1,4,16,64,128,512,2048] [--reps 15]

Per weight shape of MiniLM-L6 and bert-base ([out, in]) and row count, GFLOP/s of
  ours      kernels.cpu._linear: _linear_rows on the weight laid out in panels once (read-only, as a model's weights)
  blas-C    np.matmul(x, w.T) + b on the same weight (BLAS's transposed product)
  blas-F    the same on a Fortran-ordered copy (BLAS's no-transpose product: the layout the backend kept before)
and ours / the faster BLAS form. The weights are cycled through ~100 MB of copies, so they come from memory, as in a
forward; the variants alternate every round (the order rotating) and the figure is the median. Thread counts are set
for both Numba and BLAS (threadpoolctl). For figures, unset this machine's OpenBLAS overrides in the command alone:
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/linear_rows.py
"""
import minifca  # noqa: I001  (first, as users import it: it sets OPENBLAS_THREAD_TIMEOUT before NumPy loads)
import argparse
import time

import numba
import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from minifca.kernels.cpu import _laid_out, _linear

SHAPES = {"MiniLM": [(384, 384), (1152, 384), (1536, 384), (384, 1536)],
          "bert-base": [(768, 768), (2304, 768), (3072, 768), (768, 3072)]}


def blas(x, w, b):
    y = np.matmul(x, w.T)
    y += b
    return y


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rows", default="1,4,16,64,128,512,2048")
    ap.add_argument("--reps", type=int, default=15)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    kernels = sorted({(lib.get("internal_api"), lib.get("architecture")) for lib in threadpool_info()
                      if lib["user_api"] == "blas"}, key=str)
    print(f"BLAS: {kernels}; numba threading layer after first use below")
    for threads in (int(t) for t in a.threads.split(",")):
        numba.set_num_threads(threads)
        with threadpool_limits(threads, user_api="blas"):
            print(f"\n== {threads} thread(s): GFLOP/s ours / blas-C / blas-F, and ours over the faster BLAS ==")
            for model, shapes in SHAPES.items():
                for out_, in_ in shapes:
                    copies = max(1, int(100e6 // (out_ * in_ * 4)))
                    ws = [rng.standard_normal((out_, in_), dtype=np.float32) for _ in range(copies)]
                    for w in ws:
                        w.flags.writeable = False                    # as a model's: laid out once, before timing
                        _laid_out(w)
                    wf = [np.asfortranarray(w) for w in ws]
                    b = rng.standard_normal(out_, dtype=np.float32)
                    cells = []
                    for rows in (int(r) for r in a.rows.split(",")):
                        x = rng.standard_normal((rows, in_), dtype=np.float32)
                        forms = {"ours": lambda i: _linear(x, ws[i % copies], b),
                                 "blas-C": lambda i: blas(x, ws[i % copies], b),
                                 "blas-F": lambda i: blas(x, wf[i % copies], b)}
                        for f in forms.values():
                            f(0)
                        ts = {k: [] for k in forms}
                        names = list(forms)
                        for r in range(a.reps):
                            for k in names[r % 3:] + names[:r % 3]:
                                t = time.perf_counter()
                                forms[k](r)
                                ts[k].append(time.perf_counter() - t)
                        g = {k: 2 * rows * out_ * in_ / np.median(v) / 1e9 for k, v in ts.items()}
                        cells.append(f"{rows}: {g['ours']:.0f}/{g['blas-C']:.0f}/{g['blas-F']:.0f} "
                                     f"{g['ours'] / max(g['blas-C'], g['blas-F']):.2f}x")
                    print(f"{model} {out_}x{in_}  " + "  ".join(cells), flush=True)
    print(f"numba threading layer: {numba.threading_layer()}")


if __name__ == "__main__":
    main()
