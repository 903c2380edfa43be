"""The CUDA backend on a real GPU: parity with the NumPy reference, and speed against torch.

    from minifca.kernels.cuda_bench import parity, bench_cuda
    parity(model, ids, mask, fca)      # max |cuda - numpy| of the final units, and equal FCA decisions
    bench_cuda(folder, ids, mask, fca) # rows {impl, ms, sequences_per_s}: ours (full, FCA) vs torch fp32

torch and transformers are imported here only (they time the comparison; the package never
needs them). Times are medians of `repeats` forwards after `warmup` ones, each from host token
ids to host final hidden states, the device synchronised.
"""
from __future__ import annotations

import time

import numpy as np

from .. import reference
from ..fca import FCAConfig, sequence_keys


def _median_ms(fn, repeats, warmup, sync=lambda: None):
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def bench_matmul(M, K, N, tiles, repeats=20) -> dict:
    """TFLOP/s of the matmul_bias_act kernel (x [M, K] @ w[N, K].T + b) with the given tiles."""
    from numba import cuda
    from .cuda import CudaOps
    ops = CudaOps(tiles=tiles)
    rng = np.random.default_rng(0)
    x, w, b = (cuda.to_device(rng.standard_normal(s).astype(np.float32)) for s in ((M, K), (N, K), (N,)))
    ms = _median_ms(lambda: ops._linear(x, w, b), repeats, 3, cuda.synchronize)
    return {"tiles": tiles, "shape": [M, K, N], "ms": ms, "tflops": 2 * M * K * N / ms / 1e9}


def parity(model, ids, mask, fca: FCAConfig | None = None) -> dict:
    """Our CUDA forward vs reference.bert_forward on the same weights: max abs difference of the
    final valid units (and of every hidden state when fca is None), and whether FCA kept the same units."""
    keys = sequence_keys(ids, mask) if fca is not None else None
    kw = dict(fca=fca, keys=keys, output_hidden_states=fca is None)
    got = model.ops.bert_forward(model.params, model.config, ids, mask, np.zeros_like(ids), **kw)
    want = reference.bert_forward(model.params, model.config, ids, mask, np.zeros_like(ids), **kw)
    same = got["mask"].shape == want["mask"].shape and np.array_equal(got["mask"], want["mask"])
    valid = want["mask"][:, :, None] > 0
    diff = float(np.abs(np.where(valid, got["last_hidden_state"] - want["last_hidden_state"], 0)).max()) if same else np.inf
    out = {"max_abs_diff": diff, "same_units": bool(same), "units_out": int(want["mask"].sum())}
    if fca is None:
        out["max_abs_diff_all_layers"] = max(float(np.abs(g - w).max()) for g, w in
                                             zip(got["hidden_states"], want["hidden_states"]))
    return out


def bench_cuda(model, ids, mask, fca: FCAConfig | None = None, repeats=20, warmup=3, torch_impl="sdpa") -> dict:
    """Median ms per forward of a [B, L] batch: minifca cuda (full, FCA) and transformers on torch
    CUDA fp32 with TF32 off and on. model: a minifca Model built with backend="cuda"."""
    import torch
    import transformers
    from numba import cuda

    tt = np.zeros_like(ids)
    B = len(ids)
    rows = []

    def ours(f):
        keys = sequence_keys(ids, mask) if f is not None else None
        return lambda: model.ops.bert_forward(model.params, model.config, ids, mask, tt, fca=f, keys=keys)

    rows.append({"impl": "minifca cuda, full", "ms": _median_ms(ours(None), repeats, warmup, cuda.synchronize)})
    if fca is not None:
        rows.append({"impl": f"minifca cuda, FCA keep={fca.keep}",
                     "ms": _median_ms(ours(fca), repeats, warmup, cuda.synchronize)})
    tm = transformers.BertModel.from_pretrained(str(model.path), dtype=torch.float32,
                                                attn_implementation=torch_impl, add_pooling_layer=False).cuda().eval()
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32

        def theirs():
            with torch.inference_mode():
                i = torch.from_numpy(ids).cuda()
                m = torch.from_numpy(mask).cuda()
                return tm(input_ids=i, attention_mask=m).last_hidden_state.cpu()
        rows.append({"impl": f"torch {torch.__version__} fp32 ({torch_impl}), TF32 {'on' if tf32 else 'off'}",
                     "ms": _median_ms(theirs, repeats, warmup, torch.cuda.synchronize)})
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    for r in rows:
        r["sequences_per_s"] = B / r["ms"] * 1e3
    return {"device": cuda.get_current_device().name.decode() if isinstance(cuda.get_current_device().name, bytes)
            else str(cuda.get_current_device().name), "batch": list(ids.shape),
            "valid_tokens": int(mask.sum()), "rows": rows}


def format_rows(result) -> str:
    lines = [f"device: {result['device']}; batch {result['batch'][0]} x {result['batch'][1]} "
             f"({result['valid_tokens']} valid tokens)", "| implementation | ms / batch | sequences / s |",
             "| --- | ---: | ---: |"]
    lines += [f"| {r['impl']} | {r['ms']:.2f} | {r['sequences_per_s']:.0f} |" for r in result["rows"]]
    return "\n".join(lines)
