"""How far can FCA's speedup go at batch 1 if only the weight products counted? A ceiling from the products alone.

    python benchmarks/products_ceiling.py [--model minilm-l6] [--shape 1x128] [--rounds 12]

For the full forward and for FCA at the bench's FLOPs targets (half, third: `bench.fca_keep_for`, as `minifca bench`
picks them), the script takes the row counts every weight product of that forward runs on (from the forward's
own unit counts: a layer's Q/K/V/O products at the layer's input units, its FFN at the units the layer keeps) and
times exactly that sequence of products, through `kernels/cpu._linear` on the model's own laid-out weights:

- streamed: every layer's own weights, as in a forward (MiniLM's 6 layers hold 42 MB, bert-base's 12 hold 340 MB,
  more than this machine's 32 MiB L3: every forward reads them from memory again);
- cached: layer 0's weights for every layer (the same arithmetic with the weights in cache).

Rounds interleave the cases (full, FCA half, FCA third, each streamed and cached); medians over rounds. The ceiling
is (full products' time / FCA products' time) x FCA's FLOPs ratio: what speedup x FLOPs the whole forward would
reach if everything but the products (attention, LayerNorm, GELU, FCA's bookkeeping, Python) scaled perfectly
with the units. For figures, unset the OpenBLAS overrides in the command alone:
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/products_ceiling.py
"""
import minifca  # noqa: F401, I001  (first, as users import it)
import argparse
import time
from pathlib import Path

import numpy as np

from minifca import bench
from minifca.fca import FCAConfig
from minifca.kernels.cpu import _linear


def product_rows(out, n_layers, L):
    """Per layer (rows of Q/K/V/O, rows of the FFN) for a batch-1 forward's Output (full: L and L)."""
    if out.units is None:
        return [(L, L)] * n_layers
    return [(int(u["n_in"].sum()), int(u["n_out"].sum())) for u in out.units]


def products(layers, rows, x):
    """The forward's weight products in order: layer l's q, k, v, o at rows[l][0] rows, ffn i, o at rows[l][1]."""
    for p, (n_attn, n_ffn) in zip(layers, rows):
        a = p["attn"]
        for w in (a["q"], a["k"], a["v"], a["o"]):
            _linear(x[w["w"].shape[1]][:n_attn], w["w"], w["b"])
        for w in (p["ffn"]["i"], p["ffn"]["o"]):
            _linear(x[w["w"].shape[1]][:n_ffn], w["w"], w["b"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm-l6", choices=list(bench.MODELS))
    ap.add_argument("--shape", default="1x128", help="batch 1 only: 1xL")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--weights", default="weights/bench")
    a = ap.parse_args()
    B, L = (int(v) for v in a.shape.split("x"))
    if B != 1:
        ap.error("--shape must be 1xL: the ceiling is about batch 1")
    folder = bench.ensure_checkpoint(Path(a.weights), a.model, bench.MODELS[a.model])
    make, model = bench._runner("numba", folder, None)
    cfg = model.config
    n = cfg.num_hidden_layers
    cases = {"full": (product_rows(make(1, L)(), n, L), 1.0)}
    for label, target in (("FCA half", 1 / 2), ("FCA third", 1 / 3)):
        keep, flops = bench.fca_keep_for(model, L, target)
        cases[label] = (product_rows(make(1, L, FCAConfig(keep=keep))(), n, L), flops)
    rng = np.random.default_rng(0)
    x = {k: rng.standard_normal((L, k)).astype(np.float32) for k in (cfg.hidden_size, cfg.intermediate_size)}
    layers = model.params["layers"]
    weights = {"streamed": layers, "cached": [layers[0]] * n}
    times = {}
    for _ in range(a.rounds):
        for label, (rows, _) in cases.items():
            for kind, ws in weights.items():
                products(ws, rows, x)                                # once untimed: a warm loop's state
                t = time.perf_counter()
                products(ws, rows, x)
                times.setdefault((label, kind), []).append((time.perf_counter() - t) * 1e3)
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"{a.model} {a.shape}, products only, medians of {a.rounds} interleaved rounds:")
    for label, (rows, flops) in cases.items():
        s, c = med[(label, "streamed")], med[(label, "cached")]
        line = f"  {label:9s} rows {list(rows[0])}, then {rows[1][0]}: streamed {s:.2f} ms, cached {c:.2f} ms"
        if label != "full":
            line += (f"; FLOPs {flops:.3f}, ceiling speedup x FLOPs {med[('full', 'streamed')] / s * flops:.2f} "
                     f"streamed, {med[('full', 'cached')] / c * flops:.2f} cached")
        print(line, flush=True)


if __name__ == "__main__":
    main()
