"""Which formulation of x @ w^T + b is fastest for few rows on 2 threads, with the weight only as lay_out keeps it?

kernels/cpu.lay_out holds every encoder weight once, Fortran-ordered [out, in] (in memory [in, out]); `_linear`
runs np.matmul(x, w.T) then adds the bias. benchmarks/ab_weight_layout.py chose that on one core; this script
asks the question again on the 2 threads users run, at the row counts short sentences and FCA-shortened
sequences give (1..160), for the product shapes of bert-base (768/3072) and MiniLM-L6 (384/1536). Only
formulations that need no second copy of the weights are candidates (peak RSS is a target). Each one computes
the whole linear (product + bias, a C-contiguous [R, out] result, as `_linear` returns):

  x@wT         np.matmul(x, w.T); y += b                          (what _linear does now)
  x@wT+out     the same into a preallocated buffer                (no allocation)
  dot          np.dot(x, w.T); y += b
  (w@xT)T      np.matmul(w, x.T).T, then bias into a new C array  (the weight as BLAS's left operand)
  xF@wT        np.matmul(np.asfortranarray(x), w.T); y += b       (x copied to column order: a TN/NT call)
  w@xTc        np.matmul(w, np.ascontiguousarray(x.T)).T + b
  rows@gemv    one np.matmul per row ([in] @ [in, out]: BLAS's gemv), into one [R, out] array
  split2       two Python threads (np.matmul releases the GIL), each on one BLAS thread, each computing half
               of the output columns into one buffer: np.matmul(x, w.T[:, half], out=y[:, half])

For reference, two formulations that need the weight in the checkpoint's C order [out, in] instead (the other
single-copy layout: the memory-mapped file itself, no copy at all), marked C:
  C:x@wT       np.matmul(x, w.T) on the C-ordered weight
  C:(w@xT)T    np.matmul(w, x.T).T on it, bias into a new C array (kernels.cpu.FEW_ROWS' form before lay_out)

All variants run interleaved (one call of each in turn, a different order every round), --reps rounds, and the
median per variant is reported (this VM's speed drifts by tens of percent between minutes). The weights cycle
over --copies distinct matrices, so they are read from memory as in a forward (12 layers) rather than from L3.

With --forwards MODELS: whole forwards of from_pretrained's models (minilm-l6, bert-base) at batch 1 instead,
full and FCA at the uniform keeps that halve and third the FLOPs (minifca bench's), with kernels.cpu._xwt swapped
for x@wT, (w@xT)T or left as it is (_xwt), or a second model on the checkpoint's C-order weights (checkpoint),
call by call in turn; printed: median ms and, for FCA, speedup x FLOPs
ratio (1.0 = the time falls as fast as the FLOPs).

Usage, from the repository root (the override this machine sets must be unset, as users don't have it):
  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/ab_few_rows_2threads.py [--reps 60]
  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/ab_few_rows_2threads.py --forwards minilm-l6,bert-base
"""
import argparse
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minifca  # noqa: I001  (first, as users import it: it sets OPENBLAS_THREAD_TIMEOUT before NumPy loads)
import numpy as np
from threadpoolctl import ThreadpoolController

from minifca import bench
from gemm_rows import w_xt, x_wt  # the two forms, as gemm_rows.py times them

ap = argparse.ArgumentParser()
ap.add_argument("--reps", type=int, default=60)
ap.add_argument("--copies", type=int, default=4, help="distinct weight matrices cycled (bigger than the L3 cache)")
ap.add_argument("--rows", default="1,2,4,8,16,24,32,48,64,96,128,160")
ap.add_argument("--shapes", default="768x3072,3072x768,768x768,384x1536,1536x384,384x384", help="in x out")
ap.add_argument("--variants", default="")
ap.add_argument("--forwards", default="", help="models: time whole forwards instead of the products alone")
ap.add_argument("--forward-shapes", default="1x128,1x16")
ap.add_argument("--forms", default="x@wT,(w@xT)T", help="with --forwards: x@wT, (w@xT)T, _xwt, checkpoint")
a = ap.parse_args()

blas = ThreadpoolController().select(user_api="blas").lib_controllers[0]
_set_threads = blas._get_symbol("openblas_set_num_threads")                       # a C call, ~1 us
THREADS = blas.num_threads


class Half(threading.Thread):
    """A worker thread that computes the second half of the output columns while the caller computes the first."""

    def __init__(self):
        super().__init__(daemon=True)
        self.go, self.done, self.job = threading.Semaphore(0), threading.Semaphore(0), None
        self.start()

    def run(self):
        while True:
            self.go.acquire()
            self.job()
            self.done.release()

    def __call__(self, job):
        self.job = job
        self.go.release()


HALF = Half()


def x_wt_out(x, w, b, buf):
    y = np.matmul(x, w.T, out=buf[: x.shape[0]])
    y += b
    return y


def dot(x, w, b):
    y = np.dot(x, w.T)
    y += b
    return y


def xf_wt(x, w, b):
    y = np.matmul(np.asfortranarray(x), w.T)
    y += b
    return y


def w_xtc(x, w, b):
    return np.add(np.matmul(w, np.ascontiguousarray(x.T)).T, b, out=np.empty((x.shape[0], w.shape[0]), np.float32))


def rows_gemv(x, w, b):
    y = np.empty((x.shape[0], w.shape[0]), np.float32)
    wt = w.T
    for r in range(x.shape[0]):
        np.matmul(x[r], wt, out=y[r])
    y += b
    return y


def split2(x, w, b):
    y = np.empty((x.shape[0], w.shape[0]), np.float32)
    h = w.shape[0] // 2
    wt = w.T                                                         # [in, out], C-contiguous
    _set_threads(1)
    HALF(lambda: np.add(np.matmul(x, wt[:, h:], out=y[:, h:]), b[h:], out=y[:, h:]))
    np.add(np.matmul(x, wt[:, :h], out=y[:, :h]), b[:h], out=y[:, :h])
    HALF.done.acquire()
    _set_threads(THREADS)
    return y


def forwards():
    """Whole forwards, kernels.cpu._xwt swapped for each form in turn (medians of --reps). The form `checkpoint`
    runs a second model that holds the checkpoint's C-order weights (not laid out) with _xwt as it is: w @ x^T
    for FEW_ROWS rows, x @ w^T above."""
    from minifca.fca import FCAConfig
    from minifca.kernels import cpu
    from minifca.model import Model
    from minifca.weights import find_weight_files, load_state, to_params
    kept = cpu._xwt
    forms = {"x@wT": lambda x2, w: np.matmul(x2, w.T), "(w@xT)T": lambda x2, w: np.matmul(w, x2.T).T, "_xwt": kept,
             "checkpoint": kept}
    names = a.forms.split(",")

    def ab(f, models):
        times = {k: [] for k in names}
        for rep in range(a.reps + 1):                                # the first round warms up
            for k in names[rep % len(names):] + names[: rep % len(names)]:
                cpu._xwt = forms[k]
                t = time.perf_counter()
                f(models[k])
                times[k].append(time.perf_counter() - t)
        cpu._xwt = kept
        return {k: float(np.median(t[1:])) * 1e3 for k, t in times.items()}

    print(bench.blas_line(bench.blas_info()), f"| BLAS threads {THREADS}, medians of {a.reps}, "
          f"load average {os.getloadavg()[0]:.1f}")
    for name in a.forwards.split(","):
        folder = bench.ensure_checkpoint(Path("weights/bench"), name, bench.MODELS[name])
        model = minifca.from_pretrained(folder, backend="numba")
        models = dict.fromkeys(names, model)
        if "checkpoint" in names:
            cfg = model.config
            models["checkpoint"] = Model(cfg, to_params(load_state(find_weight_files(folder), cfg), cfg), None,
                                         backend="numba")
        for shape in a.forward_shapes.split(","):
            B, L = (int(s) for s in shape.split("x"))
            ids = bench.random_ids(B, L, model.config.vocab_size)
            full = ab(lambda m, ids=ids: m.forward(ids), models)
            print(f"{name} {shape} full: " + ", ".join(f"{k} {v:.1f} ms" for k, v in full.items()), flush=True)
            for label, target in bench.FCA_TARGETS.items():
                keep, fl = bench.fca_keep_for(model, L, target)
                fca = FCAConfig(keep=keep)
                t = ab(lambda m, ids=ids, fca=fca: m.forward(ids, fca=fca), models)
                print(f"   FCA {label} (keep {keep:.3f}, FLOPs {fl:.2f}): " + ", ".join(
                    f"{k} {v:.1f} ms (speedup x FLOPs {full[k] / v * fl:.2f})" for k, v in t.items()), flush=True)
    print(f"load average {os.getloadavg()[0]:.1f}")


if a.forwards:
    forwards()
    sys.exit(0)

VARIANTS = {"x@wT": x_wt, "x@wT+out": x_wt_out, "dot": dot, "(w@xT)T": w_xt, "xF@wT": xf_wt, "w@xTc": w_xtc,
            "rows@gemv": rows_gemv, "split2": split2, "C:x@wT": x_wt, "C:(w@xT)T": w_xt}
names = a.variants.split(",") if a.variants else list(VARIANTS)
rows = [int(r) for r in a.rows.split(",")]
rng = np.random.default_rng(0)
print(bench.blas_line(bench.blas_info()), f"| BLAS threads {THREADS}, median of {a.reps} interleaved rounds, "
      f"{a.copies} weight copies, load average {os.getloadavg()[0]:.1f}")
print("GFLOP/s (2 R in out / median time); last column: the best variant on the laid-out weight, x@wT time / its time")
print(f"{'in x out':>10s} {'rows':>5s} " + " ".join(f"{n:>9s}" for n in names) + f" {'best':>16s}")
for shape in a.shapes.split(","):
    in_, out_ = (int(s) for s in shape.split("x"))
    ws = [np.asfortranarray(rng.standard_normal((out_, in_), dtype=np.float32)) for _ in range(a.copies)]
    wc = [np.ascontiguousarray(w) for w in ws] if any(n.startswith("C:") for n in names) else ws
    b = rng.standard_normal(out_, dtype=np.float32)
    buf = np.empty((max(rows), out_), np.float32)
    for R in rows:
        x = rng.standard_normal((R, in_), dtype=np.float32)
        want = x.astype(np.float64) @ ws[0].T.astype(np.float64) + b
        calls = {}
        for n in names:
            f = VARIANTS[n]
            extra = (buf,) if n == "x@wT+out" else ()
            calls[n] = lambda f=f, w=None, x=x, b=b, extra=extra: f(x, w, b, *extra)
            got = calls[n](w=(wc if n.startswith("C:") else ws)[0])
            assert got.shape == (R, out_) and got.flags.c_contiguous, n
            assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max() + 1e-3, n
        times = {n: [] for n in names}
        for rep in range(a.reps):
            order = names[rep % len(names):] + names[: rep % len(names)]  # a different first variant every round
            for n in order:
                w = (wc if n.startswith("C:") else ws)[rep % a.copies]
                t = time.perf_counter()
                calls[n](w=w)
                times[n].append(time.perf_counter() - t)
        med = {n: float(np.median(t)) for n, t in times.items()}
        gf = {n: 2 * R * in_ * out_ / med[n] / 1e9 for n in names}
        best = min((n for n in names if not n.startswith("C:")), key=med.get)
        ratio = f"{best}:{med['x@wT'] / med[best]:.2f}x" if "x@wT" in med else best
        print(f"{shape:>10s} {R:5d} " + " ".join(f"{gf[n]:9.0f}" for n in names) + f" {ratio:>16s}", flush=True)
print(f"load average {os.getloadavg()[0]:.1f}")
