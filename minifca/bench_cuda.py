"""The CUDA backend on a real GPU: parity with the NumPy reference, and speed against torch.

    from minifca.bench_cuda import parity, bench_cuda
    parity(model, ids, mask, fca)      # max |cuda - numpy| of the final units, and equal FCA decisions
    bench_cuda(model, ids, mask, {"half": FCAConfig(keep=0.5)})  # rows {impl, ms, sequences_per_s}:
                                       # ours (full, FCA) vs torch fp32, TF32 off and on
    run_bench_cuda(models, shapes)     # `minifca bench --backend cuda`: random bert-base / MiniLM shapes
    kernel_profile(model, ids, mask)   # ms per kernel, host FCA work (counts / decisions), the rest

torch and transformers are imported here only (they time the comparison; the package never
needs them). Times are medians of `repeats` forwards after `warmup` ones, each from host token
ids to host final hidden states, the device synchronised.
"""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from . import bench, reference
from .errors import BackendError
from .fca import FCAConfig, sequence_seeds
from .model import from_pretrained


def bench_matmul(M, K, N, tiles, repeats=20) -> dict:
    """TFLOP/s of the matmul_bias_act kernel (x [M, K] @ w[N, K].T + b) with the given tiles, and
    what the compiler made of it (registers and local memory per thread, FMAs in the PTX)."""
    from numba import cuda

    from .kernels.cuda import CudaOps
    ops = CudaOps(tiles=tiles)
    rng = np.random.default_rng(0)
    x, w, b = (cuda.to_device(rng.standard_normal(s).astype(np.float32)) for s in ((M, K), (N, K), (N,)))
    ms = bench.median_ms(lambda: ops._linear(x, w, b), repeats, 3, cuda.synchronize)
    out = {"tiles": tiles, "shape": [M, K, N], "ms": ms, "tflops": 2 * M * K * N / ms / 1e9}
    kern = ops.kern.matmul_bias_act
    try:
        one = lambda d: next(iter(d.values())) if isinstance(d, dict) else d  # {signature: value}
        ptx = one(kern.inspect_asm())
        out.update(regs=one(kern.get_regs_per_thread()), local_bytes=one(kern.get_local_mem_per_thread()),
                   ptx_fma=ptx.count("fma.rn.f32"), ptx_ld_local=ptx.count("ld.local"))
    except Exception as e:  # noqa: BLE001 - the introspection API differs between numba-cuda versions
        out["introspection"] = f"{type(e).__name__}: {e}"
    return out


HOST_FCA = {"fca counts (host)": "count_units", "fca plan (host)": "decide_on_host"}  # label: function of kernels/cuda


def kernel_profile(model, ids, mask, fca: FCAConfig | None = None, repeats=3) -> dict:
    """Where one forward's time goes: ms per kernel (each launch synchronised, so launch gaps are
    counted), FCA's host work, and the rest (transfers, Python), per forward. The host work is
    "fca counts (host)" (`count_units`: the counts of the rules decided on the device) or
    "fca plan (host)" (`decide_on_host`: every decision, for the other rules and for trace)."""
    from numba import cuda

    from .kernels import cuda as kc
    from .kernels.cuda import KERNEL_NAMES
    ops = model.ops
    spent = dict.fromkeys(KERNEL_NAMES + tuple(HOST_FCA), 0.0)

    def timed(name, fn):
        def run(*args):
            cuda.synchronize()
            t = time.perf_counter()
            r = fn(*args)
            cuda.synchronize()
            spent[name] += time.perf_counter() - t
            return r
        return run

    class Launcher:                                       # kernel[grid, block](...) timed
        def __init__(self, name, kern):
            self.name, self.kern = name, kern

        def __getitem__(self, cfg):
            return timed(self.name, self.kern[cfg])

    seeds = sequence_seeds(ids, mask) if fca is not None else None
    tt = np.zeros_like(ids)
    fwd = lambda: reference.bert_forward(model.params, model.config, ids, mask, tt, fca=fca, ops=ops, seeds=seeds)
    fwd()
    plain_k, plain_host = ops.kern, {fn: getattr(kc, fn) for fn in HOST_FCA.values()}
    ops.kern = SimpleNamespace(**{**vars(plain_k), **{n: Launcher(n, getattr(plain_k, n)) for n in KERNEL_NAMES}})
    for label, fn in HOST_FCA.items():
        setattr(kc, fn, timed(label, plain_host[fn]))
    try:
        t = time.perf_counter()
        for _ in range(repeats):
            fwd()
        cuda.synchronize()
        total = (time.perf_counter() - t) / repeats
    finally:
        ops.kern = plain_k
        for fn, f in plain_host.items():
            setattr(kc, fn, f)
    ms = {name: 1e3 * v / repeats for name, v in spent.items()}
    ms["other (transfers, Python)"] = 1e3 * total - sum(ms.values())
    return {"batch": list(ids.shape), "fca": None if fca is None else fca.keep, "total_ms": 1e3 * total, "ms": ms}


def parity(model, ids, mask, fca: FCAConfig | None = None) -> dict:
    """Our CUDA forward vs reference.bert_forward on the same weights: max abs difference of the
    final valid units (and of every hidden state when fca is None), and whether FCA kept the same units."""
    seeds = sequence_seeds(ids, mask) if fca is not None else None
    kw = {"fca": fca, "seeds": seeds, "output_hidden_states": fca is None}
    got = reference.bert_forward(model.params, model.config, ids, mask, np.zeros_like(ids), ops=model.ops, **kw)
    want = reference.bert_forward(model.params, model.config, ids, mask, np.zeros_like(ids), **kw)
    same = got["mask"].shape == want["mask"].shape and np.array_equal(got["mask"], want["mask"])
    valid = want["mask"][:, :, None] > 0
    diff = float(np.abs(np.where(valid, got["last_hidden_state"] - want["last_hidden_state"], 0)).max()) if same else np.inf
    out = {"max_abs_diff": diff, "same_units": bool(same), "units_out": int(want["mask"].sum())}
    if fca is None:
        out["max_abs_diff_all_layers"] = max(float(np.abs(g - w).max()) for g, w in
                                             zip(got["hidden_states"], want["hidden_states"]))
    return out


def torch_model(folder, torch_impl="sdpa"):
    """transformers' BertModel on the GPU in fp32 (the comparison), or a BackendError when torch has no CUDA."""
    import torch
    import transformers
    if not torch.cuda.is_available():
        raise BackendError(f"the CUDA benchmark compares with torch on the GPU, but torch {torch.__version__} "
                           "sees no CUDA device (a CPU-only build?)")
    return transformers.BertModel.from_pretrained(str(folder), dtype=torch.float32, attn_implementation=torch_impl,
                                                  add_pooling_layer=False).cuda().eval()


def bench_cuda(model, ids, mask, fcas: dict | None = None, repeats=20, warmup=3, tm=None) -> dict:
    """Median ms per forward of a [B, L] batch: minifca cuda (full, and each FCAConfig of `fcas`,
    {label: cfg}) and transformers on torch CUDA fp32 with TF32 off and on. model: a minifca
    Model built with backend="cuda"; tm: torch_model(model.path), loaded here when None."""
    import torch
    from numba import cuda

    tt = np.zeros_like(ids)
    B = len(ids)
    rows = []

    def ours(f):
        seeds = sequence_seeds(ids, mask) if f is not None else None
        return lambda: reference.bert_forward(model.params, model.config, ids, mask, tt, fca=f, ops=model.ops, seeds=seeds)

    full = bench.median_ms(ours(None), repeats, warmup, cuda.synchronize)
    rows.append({"impl": "minifca cuda, full", "ms": full})
    for label, f in (fcas or {}).items():
        ms = bench.median_ms(ours(f), repeats, warmup, cuda.synchronize)
        out = model.forward(ids, mask, fca=f)
        rows.append({"impl": f"minifca cuda, FCA {label} (keep={f.keep:.3f})", "ms": ms,
                     "flops_ratio": float(np.sum(out.flops) / np.sum(out.flops_full)), "speedup_vs_full": full / ms})
    tm = torch_model(model.path) if tm is None else tm
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32

        def theirs():
            with torch.inference_mode():
                i = torch.from_numpy(ids).cuda()
                m = torch.from_numpy(mask).cuda()
                return tm(input_ids=i, attention_mask=m).last_hidden_state.cpu()
        rows.append({"impl": f"torch {torch.__version__} fp32 ({tm.config._attn_implementation}), "
                             f"TF32 {'on' if tf32 else 'off'}",
                     "ms": bench.median_ms(theirs, repeats, warmup, torch.cuda.synchronize)})
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    for r in rows:
        r["sequences_per_s"] = B / r["ms"] * 1e3
    return {"device": device_name(), "batch": list(ids.shape), "valid_tokens": int(mask.sum()), "rows": rows}


def device_name() -> str:
    from numba import cuda

    from .kernels.cuda import simulated
    if simulated():
        return "Numba CUDA simulator"
    name = cuda.get_current_device().name
    return name.decode() if isinstance(name, bytes) else str(name)


def run_bench_cuda(models: dict, shapes, runs=20, fca_targets=None, root="weights/bench") -> dict:
    """`minifca bench --backend cuda`: for each {name: BertConfig fields} model (a random-weight
    checkpoint, bench.ensure_checkpoint) and (B, L) shape, bench_cuda on random ids, with FCA at
    the uniform keep whose FLOPs ratio is closest above each target (bench.fca_keep_for)."""
    from .kernels.cuda import load_cuda, simulated
    load_cuda()                                                          # no GPU: the BackendError, first
    if simulated():
        raise BackendError("the CUDA benchmark needs a real GPU; unset NUMBA_ENABLE_CUDASIM")
    res = {"device": device_name(), "runs": runs, "models": {}}
    for name, shape in models.items():
        folder = bench.ensure_checkpoint(Path(root), name, shape)
        model = from_pretrained(folder, backend="cuda")
        tm = torch_model(folder)
        res["models"][name] = []
        for B, L in shapes:
            bench.log(f"cuda {name} {B}x{L}")
            fcas = {t: FCAConfig(keep=bench.fca_keep_for(model, L, target)[0])
                    for t, target in (fca_targets or {}).items()}
            ids = bench.random_ids(B, L, model.config.vocab_size)
            res["models"][name].append(bench_cuda(model, ids, np.ones_like(ids), fcas, repeats=runs, tm=tm))
    return res


def print_bench_cuda(res):
    print(f"device: {res['device']}; medians of {res['runs']} forwards (host ids -> host hidden states)")
    for name, results in res["models"].items():
        print(f"\n== {name} (random weights) ==")
        for r in results:
            print(format_rows(r))


def format_rows(result) -> str:
    lines = [(f"device: {result['device']}; batch {result['batch'][0]} x {result['batch'][1]} "
             f"({result['valid_tokens']} valid tokens)"),
             "| implementation | ms / batch | sequences / s | FLOPs ratio | speedup vs our full |",
             "| --- | ---: | ---: | ---: | ---: |"]
    extra = lambda r: (f"{r['flops_ratio']:.2f} | {r['speedup_vs_full']:.2f}x" if "flops_ratio" in r else " | ")
    lines += [f"| {r['impl']} | {r['ms']:.2f} | {r['sequences_per_s']:.0f} | {extra(r)} |" for r in result["rows"]]
    return "\n".join(lines)
