"""`minifca bench`: our backends beside torch and ONNX Runtime on the CPU, with and without FCA.

One run measures, side by side:
  - the machine's sgemm GFLOP/s (NumPy, 2048^3; the better of a measurement before the engines and one after,
    as a slow spell of a shared host can fall on either): the ceiling for any of these engines;
  - minifca (numba, numpy backends), torch (transformers BertModel, fp32, inference_mode) and
    ONNX Runtime (the same weights exported with torch.onnx, all graph optimisations), each in
    its own process, with the same thread count, on random-weight bert-base and MiniLM-L6 shapes: all loaded
    at once, then taking turns (one runs at a time, so thread pools never compete, and a slow spell of the
    machine falls on every engine alike), each turn a forward after an untimed one (so it is warm, as in a loop
    of calls); medians of `runs` rounds after warm-up;
  - FCA at the uniform keep that halves the FLOPs and at the one that thirds them: FLOPs ratio
    and wall-clock speedup against our own full forward;
  - peak RSS after loading + one forward (fresh process), against the checkpoint's size;
  - time to first output of MiniLM-L6 (`minifca run`) in a fresh process with a warm cache;
  - with --profile, where the numba forward's time goes (ms per op, full and FCA half).
Progress goes to stderr; the table (or one JSON object with --json) to stdout.
Random checkpoints are written once by transformers to weights/bench/ (git-ignored).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from . import fca as fca_mod
from .config import BertConfig
from .errors import InputError
from .fca import FCAConfig
from .flops import head_flops, model_flops
from .model import from_pretrained

MODELS = {"bert-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
          "minilm-l6": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536}}
QUICK_MODELS = {"tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
                             "vocab_size": 1000, "max_position_embeddings": 64}}
SHAPES = [(1, 128), (8, 128), (32, 64)]
QUICK_SHAPES = [(1, 16), (4, 16)]
FCA_TARGETS = {"half": 1 / 2, "third": 1 / 3}
ENGINES = ("numba", "numpy", "torch", "onnxruntime")


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def times_ms(fn, runs, warmup=2, sync=None):
    """The one clock of the benchmarks: wall-clock ms of `runs` calls of fn after `warmup` ones; sync
    (e.g. cuda.synchronize) is called before the clock starts and inside each timing."""
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        ts.append(time.perf_counter() - t)
    return [1e3 * t for t in ts]


def median_ms(fn, runs, warmup=2, sync=None):
    """Median of times_ms: what `minifca bench` reports."""
    return float(np.median(times_ms(fn, runs, warmup, sync)))


def best_ms(fn, runs, warmup=1):
    """Best of times_ms: what the A/B experiments in benchmarks/ report (the least disturbed run)."""
    return min(times_ms(fn, runs, warmup))


def sgemm_gflops(n=2048, runs=5):
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    return 2 * n ** 3 / median_ms(lambda: a @ a, runs, warmup=1) / 1e6


BLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")   # set on some machines for old OpenBLAS builds


def blas_info():
    """The BLAS libraries NumPy's products run on, as threadpoolctl sees them: library, version, kernel
    (OpenBLAS's `architecture` is the core type whose kernels it picked: SkylakeX, Haswell, ...), and any
    OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE override in the environment (OpenBLAS then runs the kernel it names,
    not the one it would pick for this CPU, and sgemm can run at half its rate)."""
    from threadpoolctl import threadpool_info
    libs = [{"library": i["internal_api"], "version": i.get("version"), "kernel": i.get("architecture"),
             "threading": i.get("threading_layer"), "threads": i.get("num_threads"),
             "file": os.path.basename(i["filepath"])} for i in threadpool_info() if i["user_api"] == "blas"]
    return {"libraries": libs, "overrides": {k: os.environ[k] for k in BLAS_OVERRIDES if k in os.environ}}


def blas_line(info):
    libs = "; ".join(f"{b['library']} {b['version']} ({b['kernel'] or 'kernel not reported'} kernel, "
                     f"{b['threading']} threads)" for b in info["libraries"]) or "none found"
    return f"BLAS: {libs}"


def override_warning(info):
    if not info["overrides"]:
        return None
    set_ = ", ".join(f"{k}={v}" for k, v in info["overrides"].items())
    unset = " ".join(f"-u {k}" for k in info["overrides"])
    return (f"warning: {set_} is set: OpenBLAS runs the kernel it names, not the one it picks for this CPU, so the "
            f"figures of every engine that uses OpenBLAS are not what users get (rerun with `env {unset} minifca bench`)")


def random_ids(B, L, vocab, seed=0):
    return np.random.default_rng(seed).integers(1000 % vocab, vocab, (B, L))


# ---------------------------------------------------------------- checkpoints


def write_random_checkpoint(folder, seed=0, head=None, perturb=0.0, dtype="float32", max_shard_size=None,
                            **shape) -> Path:
    """A random-weight BERT written by transformers (save_pretrained, safetensors): the one writer of the
    benchmarks and the tests. shape: any BertConfig fields; head: None (BertModel), "classifier", "token"
    (BertForTokenClassification) or "mlm";
    perturb: the spread of noise added to every parameter (breaks the zero-init symmetry of biases and
    LayerNorms, so every tensor matters); dtype: "float32", "float16" or "bfloat16". Returns the folder."""
    import torch
    import transformers
    torch.manual_seed(seed)
    cls = {"classifier": transformers.BertForSequenceClassification, "mlm": transformers.BertForMaskedLM,
           "token": transformers.BertForTokenClassification, None: transformers.BertModel}[head]
    model = cls(transformers.BertConfig(**shape)).eval()
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * perturb)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(folder, safe_serialization=True, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return Path(folder)


def ensure_checkpoint(root: Path, name: str, shape: dict) -> Path:
    """weights/bench/<name>: a random-weight BertModel written by transformers (once)."""
    folder = root / name
    if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
        return folder
    if not (importable("torch") and importable("transformers")):
        raise InputError(f"{folder}: no benchmark checkpoint there, and writing one needs torch + transformers")
    log(f"writing random checkpoint {folder}")
    return write_random_checkpoint(folder, **shape)


def export_onnx(folder: Path) -> Path:
    """The checkpoint exported once with torch.onnx (dynamic batch and length)."""
    path = folder / "model.onnx"
    if path.is_file():
        return path
    import torch
    import transformers
    log(f"exporting {path}")
    bert = transformers.BertModel.from_pretrained(str(folder), dtype=torch.float32).eval()

    class Encoder(torch.nn.Module):                                  # positional (ids, mask) -> hidden states
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.ones((2, 8), dtype=torch.long)
    axes = {0: "batch", 1: "length"}
    torch.onnx.export(Encoder().eval(), (ids, torch.ones_like(ids)), str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["last_hidden_state"], dynamic_axes={"input_ids": axes, "attention_mask": axes,
                                                                        "last_hidden_state": axes},
                      opset_version=17, dynamo=False)
    return path


# ---------------------------------------------------------------- one engine in its own process


def _runner(engine, folder, threads):
    """A function (B, L) -> callable that runs one forward of `engine` on random ids."""
    vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    if engine in ("numba", "numpy"):
        model = from_pretrained(folder, backend=engine)

        def make(B, L, fca=None):
            ids = random_ids(B, L, vocab)
            return lambda: model.forward(ids, fca=fca)
        return make, model
    if engine == "torch":
        import torch
        import transformers
        torch.set_num_threads(threads)
        model = transformers.BertModel.from_pretrained(str(folder), dtype=torch.float32).eval()

        def make(B, L, fca=None):
            ids = torch.from_numpy(random_ids(B, L, vocab))
            mask = torch.ones_like(ids)

            def run():
                with torch.inference_mode():
                    return model(input_ids=ids, attention_mask=mask)
            return run
        return make, None
    if engine == "onnxruntime":
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        sess = ort.InferenceSession(str(Path(folder) / "model.onnx"), so, providers=["CPUExecutionProvider"])

        def make(B, L, fca=None):
            ids = random_ids(B, L, vocab).astype(np.int64)
            feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            return lambda: sess.run(None, feed)
        return make, None
    raise InputError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")


def fca_keep_for(model, L, target):
    """The smallest uniform keep count k (keep = k / L) whose FLOPs ratio is still >= target."""
    ids = random_ids(1, L, model.config.vocab_size)

    def ratio(k):
        out = model.forward(ids, fca=FCAConfig(keep=k / L))
        return out.flops / out.flops_full
    lo, hi = 1, L                                                    # ratio(L) = 1 >= target
    while lo < hi:
        mid = (lo + hi) // 2
        if ratio(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo / L, ratio(lo)


def serve(spec):
    """One engine in its own process, timed one forward at a time when asked (`Engine`, `interleaved`).

    Loads the engine, makes every case (each shape; for our backends also FCA at each FLOPs target), runs each
    twice (warm-up), prints one JSON line {"cases": [...], "fca": {case: {keep, flops_ratio}}}, then for each case
    name read from stdin runs it once untimed and times the next forward (so each figure is a warm forward, as in a
    loop of calls: its caches and thread pool as the same forward left them, not as another engine's did) and
    prints {"ms": ...}, after a pause in which its thread pool stops spinning (so the next engine's forward has
    the cores to itself); an empty line or EOF ends it."""
    make, model = _runner(spec["engine"], spec["folder"], spec["threads"])
    cases, fca = {}, {}
    for B, L in spec["shapes"]:
        cases[f"{B}x{L}"] = make(B, L)
        for name, target in (spec.get("fca") or {}).items() if model is not None else ():
            keep, ratio = fca_keep_for(model, L, target)
            cases[f"{B}x{L} fca_{name}"] = make(B, L, FCAConfig(keep=keep))
            fca[f"{B}x{L} fca_{name}"] = {"keep": keep, "flops_ratio": ratio}
    for fn in cases.values():
        times_ms(fn, 0)                                              # warm-up: 2 forwards
    print(json.dumps({"cases": list(cases), "fca": fca}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        ms = times_ms(cases[line.strip()], 1, warmup=1)[0]
        time.sleep(SETTLE_S)
        print(json.dumps({"ms": ms}), flush=True)


SETTLE_S = 0.02   # after each timed forward: ORT's and OpenMP's idle threads spin a few ms before they sleep


class Engine:
    """A `serve` process: `time(case)` is one forward's ms, measured there."""

    def __init__(self, spec, threads):
        self.name = spec["engine"]
        self.proc = subprocess.Popen([sys.executable, "-m", "minifca.bench", "serve", json.dumps(spec)],
                                     env=worker_env(threads), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def reply(self):
        for line in self.proc.stdout:                                # skipping any line a library printed
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict):
                return msg
        raise RuntimeError(f"{self.name} worker exited with {self.proc.wait()}")

    def time(self, case):
        self.proc.stdin.write(case + "\n")
        self.proc.stdin.flush()
        return self.reply()["ms"]

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("\n")
                self.proc.stdin.flush()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def interleaved(specs, threads, runs):
    """Every engine of `specs` (engine -> `serve` spec) in its own process, all loaded at once, then timed taking
    turns: in each of `runs` rounds, case by case, one warm forward of each engine in turn (`serve`; the order
    rotating), only one running at a time. So thread pools never compete, and a slow spell of the machine (this VM's neighbours)
    falls on every engine alike instead of on whichever ran then. Returns engine -> {"shapes": {shape: {"ms",
    "fca_<name>": {keep, flops_ratio, ms}}}} (medians), or {"error": ...} for an engine that failed."""
    engines, ready, out = {}, {}, {}
    for e, spec in specs.items():
        engines[e] = Engine(spec, threads)
    for e, eng in list(engines.items()):
        try:
            ready[e] = eng.reply()
        except RuntimeError as err:
            out[e] = {"error": str(err)}
            engines.pop(e).close()
    cases = list(dict.fromkeys(c for r in ready.values() for c in r["cases"]))
    times = {(e, c): [] for e in engines for c in ready[e]["cases"]}
    try:
        for r in range(runs):
            log(f"  round {r + 1}/{runs}: " + ", ".join(engines))
            for case in cases:
                turn = [e for e in engines if case in ready[e]["cases"]]
                for e in turn[r % len(turn):] + turn[:r % len(turn)]:
                    times[e, case].append(engines[e].time(case))
    except RuntimeError as err:                                      # an engine died mid-run: report, not raise
        for e in engines:
            out.setdefault(e, {"error": str(err)})
    finally:
        for eng in engines.values():
            eng.close()
    for e in engines:
        if e in out:
            continue
        shapes = {}
        for case in ready[e]["cases"]:
            shape, _, fca = case.partition(" ")
            ms = float(np.median(times[e, case]))
            if fca:
                shapes[shape][fca] = ready[e]["fca"][case] | {"ms": ms}
            else:
                shapes[shape] = {"ms": ms}
                log(f"  {e:12s} {Path(specs[e]['folder']).name} {shape}: {ms:.1f} ms")
        out[e] = {"shapes": shapes}
    return out


PROFILED = {"embeddings": "embeddings", "_linear": "linear (Q, K, V, O, FFN in and out)", "ffn": "ffn",
            "_act_rows": "activation", "_attend": "attention core (Numba)",
            "_stats": "FCA statistics", "add_layer_norm": "residual + LayerNorm"}


def profile_worker(spec):
    """Where the numba forward's time goes: wall ms per op per forward (medians of `runs`), by wrapping
    the module functions `bert_forward` calls; `ffn` includes its two linears and its activation."""
    from .kernels import cpu
    make, model = _runner("numba", spec["folder"], spec["threads"])
    spent = {}

    def timed(fn, name):
        def run(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
        return run
    for name in PROFILED:
        setattr(cpu, name, timed(getattr(cpu, name), name))
    fca_mod.FCAState.reduce = timed(fca_mod.FCAState.reduce, "fca_reduce")
    res = {}
    for B, L in spec["shapes"]:
        for label, fca in (("full", None), ("fca_half", "half")):
            keep = fca_keep_for(model, L, FCA_TARGETS[fca])[0] if fca else None
            fn = make(B, L, FCAConfig(keep=keep) if fca else None)
            fn()
            rows = []
            for _ in range(spec["runs"]):
                spent.clear()
                t = time.perf_counter()
                fn()
                rows.append(dict(spent, total=time.perf_counter() - t))
            res[f"{B}x{L} {label}"] = {k: float(np.median([r.get(k, 0.0) for r in rows])) * 1e3 for k in rows[0]}
    return res


def peak_rss_bytes():
    """This process's peak resident set (VmHWM; ru_maxrss would carry the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_worker(spec):
    import minifca
    if spec["engine"] == "numba":
        import minifca.kernels.cpu  # noqa: F401  (Numba itself is part of the import cost)
    base = peak_rss_bytes()
    model = from_pretrained(spec["folder"], backend=spec["engine"])
    B, L = spec["shape"]
    model.forward(random_ids(B, L, model.config.vocab_size))
    return {"rss_after_imports": base, "peak_rss": peak_rss_bytes()}


def worker_env(threads):
    return dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
                NUMBA_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def subprocess_json(func, spec, threads):
    cmd = [sys.executable, "-m", "minifca.bench", func, json.dumps(spec)]
    p = subprocess.run(cmd, env=worker_env(threads), stdout=subprocess.PIPE, text=True, check=False)
    if p.returncode != 0:
        return {"error": f"{spec.get('engine')} worker exited with {p.returncode}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def first_output_seconds(threads, model_path=None, runs=3):
    """Wall-clock of `minifca run <text>` (all-MiniLM-L6-v2, numba backend) in a fresh process, cache warm."""
    cmd = [sys.executable, "-m", "minifca.cli", "run", "--backend", "numba", "A first sentence."]
    if model_path:
        cmd += ["--model", str(model_path)]
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True)   # warms the Numba cache
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


# ---------------------------------------------------------------- the whole benchmark


def importable(name):
    import importlib.util
    return importlib.util.find_spec(name) is not None


def run_bench(backends=("numba", "numpy"), quick=False, runs=None, threads=None, root="weights/bench",
              first_output_model=None, profile=False):
    threads = threads or os.cpu_count()
    runs = runs or (2 if quick else 5)
    models, shapes = (QUICK_MODELS, QUICK_SHAPES) if quick else (MODELS, SHAPES)
    engines = list(backends) + [e for e in ("torch", "onnxruntime") if importable(e)]
    blas = blas_info()
    log(blas_line(blas))
    if override_warning(blas):
        log(override_warning(blas))
    n_sgemm = 512 if quick else 2048
    log(f"sgemm ({n_sgemm}^3, NumPy)")
    peaks = [sgemm_gflops(n_sgemm, runs)]                            # again after the engines: the best of the two
    res = {"machine": {"cpu_count": os.cpu_count(), "threads": threads, "numpy": np.__version__, "blas": blas},
           "runs": runs, "interleaved": True, "engines": engines, "models": {}}
    for name, shape in models.items():
        folder = ensure_checkpoint(Path(root), name, shape)
        cfg = BertConfig.from_json(folder / "config.json")
        size = (folder / "model.safetensors").stat().st_size
        entry = {"checkpoint_bytes": size, "shapes": {}, "engines": {}}
        specs = {}
        for e in engines:
            if e == "onnxruntime":
                try:
                    export_onnx(folder)
                except Exception as err:  # noqa: BLE001 - an exporter failure is reported, not fatal
                    entry["engines"][e] = {"error": f"onnx export failed: {type(err).__name__}: {err}"}
                    continue
            specs[e] = {"engine": e, "folder": str(folder), "shapes": shapes, "threads": threads,
                        "fca": FCA_TARGETS if e in ("numba", "numpy") else None}
        log(f"{name}: {', '.join(specs)}, taking turns")
        entry["engines"].update(interleaved(specs, threads, runs))
        entry["engines"] = {e: entry["engines"][e] for e in engines if e in entry["engines"]}  # the engines' order
        for B, L in shapes:
            flops = int(model_flops(cfg, np.full(B, L), None, head_flops(cfg, True, False)).sum())
            key, row = f"{B}x{L}", {"flops": flops}
            times = {e: r["shapes"][key]["ms"] for e, r in entry["engines"].items() if "shapes" in r}
            for e, ms in times.items():
                r = {"ms": ms, "gflops": flops / ms / 1e6}
                for ref in ("torch", "onnxruntime"):
                    if ref in times and ref != e:
                        r[f"speedup_vs_{ref}"] = times[ref] / ms
                for f in FCA_TARGETS:
                    fr = entry["engines"][e]["shapes"][key].get(f"fca_{f}")
                    if fr:
                        r[f"fca_{f}"] = fr | {"speedup": ms / fr["ms"],
                                              "efficiency": (ms / fr["ms"]) * fr["flops_ratio"]}
                row[e] = r
            entry["shapes"][key] = row
        rss_shape = (1, min(128, cfg.max_position_embeddings))
        for e in backends:
            log(f"{name}: peak RSS ({e}, load + one {rss_shape[0]}x{rss_shape[1]} forward)")
            r = subprocess_json("rss", {"engine": e, "folder": str(folder), "shape": rss_shape}, threads)
            if "peak_rss" in r:
                r["ratio_to_checkpoint"] = r["peak_rss"] / size
                r["ratio_to_checkpoint_above_imports"] = (r["peak_rss"] - r["rss_after_imports"]) / size
            entry.setdefault("rss", {})[e] = r
        if profile and "numba" in backends:
            log(f"{name}: numba forward, time per op")
            entry["profile"] = subprocess_json("profile", {"folder": str(folder), "shapes": shapes, "runs": runs,
                                                           "threads": threads}, threads)
        res["models"][name] = entry
    log(f"sgemm ({n_sgemm}^3, NumPy), again")
    peaks.append(sgemm_gflops(n_sgemm, runs))
    peak = res["machine"]["sgemm_gflops"] = max(peaks)              # a slow spell of a noisy host can fall on
    res["machine"]["sgemm_gflops_each"] = peaks                      # one measurement
    for entry in res["models"].values():
        for row in entry["shapes"].values():
            for r in (v for v in row.values() if isinstance(v, dict)):  # each engine's figures
                r["peak_fraction"] = r["gflops"] / peak
    log("time to first output (fresh process, warm cache)")
    try:
        res["first_output_seconds"] = first_output_seconds(threads, first_output_model, 1 if quick else 3)
    except Exception as err:  # noqa: BLE001 (reported, not raised)
        res["first_output_seconds"] = None
        res["first_output_error"] = f"{type(err).__name__}: {err}"
    return res


def print_report(res):
    m = res["machine"]
    each = m.get("sgemm_gflops_each")
    both = f" (best of {' and '.join(f'{v:.1f}' for v in each)}: before and after the engines)" if each else ""
    print(f"machine: {m['cpu_count']} cores, {m['threads']} threads, sgemm {m['sgemm_gflops']:.1f} GFLOP/s{both}; "
          f"medians of {res['runs']} {'interleaved rounds' if res.get('interleaved') else 'runs'}")
    if "blas" in m:
        print(blas_line(m["blas"]))
        if override_warning(m["blas"]):
            print(override_warning(m["blas"]))
    for name, entry in res["models"].items():
        print(f"\n== {name} (checkpoint {entry['checkpoint_bytes'] / 2**20:.1f} MiB) ==")
        print(f"{'shape':>7} {'engine':>12} {'ms':>9} {'GFLOP/s':>8} {'%peak':>6} {'vs torch':>8} {'vs ORT':>7}"
              f"   FCA half: keep FLOPs speedup | FCA third: keep FLOPs speedup")
        for key, row in entry["shapes"].items():
            for e in res["engines"]:
                r = row.get(e)
                if r is None:
                    continue
                vt = f"{r['speedup_vs_torch']:.2f}x" if "speedup_vs_torch" in r else "-"
                vo = f"{r['speedup_vs_onnxruntime']:.2f}x" if "speedup_vs_onnxruntime" in r else "-"
                fca = "".join(f"   {r[k]['keep']:.3f} {r[k]['flops_ratio']:.2f} {r[k]['speedup']:.2f}x"
                              for k in ("fca_half", "fca_third") if k in r)
                print(f"{key:>7} {e:>12} {r['ms']:9.1f} {r['gflops']:8.1f} {r['peak_fraction']:6.1%} {vt:>8} "
                      f"{vo:>7}{fca}")
        for e, r in entry.get("rss", {}).items():
            if "peak_rss" in r:
                print(f"peak RSS ({e}): {r['peak_rss'] / 2**20:.0f} MiB = {r['ratio_to_checkpoint']:.2f}x checkpoint "
                      f"({r['rss_after_imports'] / 2**20:.0f} MiB after imports, before loading)")
        for case, ops in entry.get("profile", {}).items():
            if isinstance(ops, dict):
                parts = ", ".join(f"{PROFILED.get(k, k)} {v:.1f}" for k, v in ops.items() if k != "total")
                print(f"numba {case}: {ops['total']:.1f} ms = {parts}")
        for e, r in entry["engines"].items():
            if "error" in r:
                print(f"{e}: {r['error']}")
    if res.get("first_output_seconds") is not None:
        print(f"\ntime to first output (minifca run, all-MiniLM-L6-v2, fresh process, warm cache): "
              f"{res['first_output_seconds']:.2f} s")


if __name__ == "__main__":
    kind, spec = sys.argv[1], json.loads(sys.argv[2])
    if kind == "serve":
        serve(spec)
    else:
        print(json.dumps({"rss": rss_worker, "profile": profile_worker}[kind](spec)))
