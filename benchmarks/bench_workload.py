"""The real workload: mixed-length SST-2 sentences embedded (all-MiniLM-L6-v2) and classified (minilm-l6-sst2),
minifca beside the ways people run the same job, texts/s side by side in one run.

Usage: python benchmarks/bench_workload.py [--limit 5000] [--batch-size 32] [--repeats 1] [--threads N]
                                        [--engines minifca torch-loop torch-sorted onnxruntime] [--json]
Each engine's wall-clock time and its process's CPU time are reported; on a loaded machine run it with
--threads 1 and read the CPU-time ratios.

Engines (each in its own fresh process, one after the other, the same thread count; every one does the whole
job: tokenize, batch, forward, pool / softmax, results in input order; the timed pass follows a warm-up pass
over the first batches):
  minifca          Model.embed / Model.classify (sorted by token count, batches of --batch-size, as many side by
                   side as there are threads, one thread each: threadlimit.side_by_side)
  minifca-given    minifca called on each --batch-size slice in the file's order (one batch per call: every
                   thread inside each forward; padding-free, so the padding costs nothing)
  minifca-one-at-a-time  minifca's sorted batches one at a time, every thread inside each (Model.embed_batches;
                   classify: the same loop over Model.batches)
  torch-loop       the usual loop: transformers + torch, tokenizer(padding=True) on each slice in the given order
  torch-sorted     the same with sentence-transformers' encode order (longest text first by characters)
  onnxruntime      ONNX Runtime (torch.onnx export, all graph optimisations) on minifca's exact batches
                   (tokenized once, sorted by token count), one at a time, every thread inside each run
  onnxruntime-side-by-side  the same batches, as many side by side as there are threads (one session,
                   intra_op_num_threads=1, run from that many Python threads): minifca's way, for ONNX Runtime
All embed engines truncate at the checkpoint's max_seq_length (256), mean-pool and L2-normalise, as encode does;
"max |diff|" checks that each one computed the same vectors (probabilities) as minifca.

The benchmark, not the library, unsets OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE for its workers (this machine's
override, which users do not have); --keep-openblas-env keeps them. The BLAS kernel NumPy
uses in the minifca worker is printed (threadpoolctl).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from minifca.assets import shared_path

ROOT = Path(__file__).resolve().parents[1]
TRAIN, SST2_MODEL = shared_path("sst2_train"), shared_path("sst2_model")
ENGINES = ["minifca", "minifca-given", "minifca-one-at-a-time", "torch-loop", "torch-sorted", "onnxruntime",
           "onnxruntime-side-by-side"]
DEFAULT_ENGINES = ["minifca", "minifca-one-at-a-time", "torch-loop", "torch-sorted", "onnxruntime",
                   "onnxruntime-side-by-side"]
LABELS = {"minifca": "minifca (numba, sorted)", "minifca-given": "minifca, given order",
          "minifca-one-at-a-time": "minifca, one batch at a time",
          "torch-loop": "torch, usual loop (given order)", "torch-sorted": "torch, sorted (encode's order)",
          "onnxruntime": "ONNX Runtime, sorted (same batches)",
          "onnxruntime-side-by-side": "ONNX Runtime, same batches side by side"}


def log(msg):
    print(f"[workload] {msg}", file=sys.stderr, flush=True)


def read_texts(limit):
    lines = TRAIN.read_text(encoding="utf-8").splitlines()[1:]
    return [line.rsplit("\t", 1)[0].strip() for line in lines if line.strip()][:limit]


def max_seq_length(folder):
    f = Path(folder) / "sentence_bert_config.json"
    return json.loads(f.read_text())["max_seq_length"] if f.is_file() else None


# ---------------------------------------------------------------- the engines (each runs in a worker process)


def minifca_job(spec, given_order=False, one_at_a_time=False):
    import minifca
    model = minifca.from_pretrained(spec["folder"])
    bs = spec["batch_size"]

    def one_call(texts):
        if spec["task"] == "embed":
            return model.embed(texts, batch_size=bs)
        return np.stack([p for _, p in model.classify(texts, batch_size=bs)])

    def sequential(texts):                                           # the sorted batches, every thread in each
        out = [None] * len(texts)
        if spec["task"] == "embed":
            for rows, v in model.embed_batches(texts, batch_size=bs):
                for r, x in zip(rows, v):
                    out[r] = x
        else:
            for rows, enc in model.batches(texts, batch_size=bs):
                for r, p in zip(rows, minifca.reference.softmax(model(enc).logits.astype(np.float64))):
                    out[r] = p
        return np.stack(out)

    def run(texts):
        if one_at_a_time:
            return sequential(texts)
        if not given_order:
            return one_call(texts)
        return np.concatenate([one_call(texts[i:i + bs]) for i in range(0, len(texts), bs)])

    def computed(texts):                                             # padding-free: the layers compute the valid
        return sum(model.tokenize(texts[i:i + bs], max_length=spec["max_length"]).attention_mask.sum()  # tokens
                   for i in range(0, len(texts), bs))
    return run, computed


def torch_job(spec, sort):
    import torch
    import transformers
    torch.set_num_threads(spec["threads"])
    tok = transformers.AutoTokenizer.from_pretrained(spec["folder"])
    cls = transformers.AutoModel if spec["task"] == "embed" else transformers.AutoModelForSequenceClassification
    model = cls.from_pretrained(spec["folder"], dtype=torch.float32).eval()
    bs, ml = spec["batch_size"], spec["max_length"]

    def order(texts):
        return np.argsort([-len(t) for t in texts], kind="stable") if sort else np.arange(len(texts))

    def run(texts):
        out = [None] * len(texts)
        idx = order(texts)
        for i in range(0, len(texts), bs):
            rows = idx[i:i + bs]
            enc = tok([texts[j] for j in rows], padding=True, truncation=True, max_length=ml, return_tensors="pt")
            with torch.inference_mode():
                if spec["task"] == "embed":
                    h = model(**enc).last_hidden_state
                    m = enc["attention_mask"][..., None].to(h.dtype)
                    y = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=1)
                else:
                    y = torch.softmax(model(**enc).logits.double(), dim=1)
            for r, v in zip(rows, y.numpy()):
                out[r] = v
        return np.stack(out)

    def computed(texts):
        idx = order(texts)
        return sum(tok([texts[j] for j in idx[i:i + bs]], padding=True, truncation=True, max_length=ml,
                       return_tensors="np")["input_ids"].size for i in range(0, len(texts), bs))
    return run, computed


def onnx_path(spec):
    return Path(spec["onnx_dir"]) / f"{spec['name']}.onnx"


def export_job(spec):
    """torch.onnx export (dynamic batch and length): hidden states (embed) or logits (classify)."""
    import torch
    import transformers
    cls = transformers.AutoModel if spec["task"] == "embed" else transformers.AutoModelForSequenceClassification
    model = cls.from_pretrained(spec["folder"], dtype=torch.float32).eval()
    name = "last_hidden_state" if spec["task"] == "embed" else "logits"

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return getattr(self.model(input_ids=input_ids, attention_mask=attention_mask), name)

    ids = torch.ones((2, 8), dtype=torch.long)
    axes = {0: "batch", 1: "length"}
    path = onnx_path(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(Wrapped().eval(), (ids, torch.ones_like(ids)), str(path), input_names=["input_ids", "attention_mask"],
                      output_names=[name], dynamic_axes={"input_ids": axes, "attention_mask": axes,
                                                         name: axes if spec["task"] == "embed" else {0: "batch"}},
                      opset_version=17, dynamo=False)
    return {"path": str(path)}


def ort_job(spec, side_by_side=False):
    import onnxruntime as ort
    from tokenizers import Tokenizer
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads, so.inter_op_num_threads = (1 if side_by_side else spec["threads"]), 1
    sess = ort.InferenceSession(str(onnx_path(spec)), so, providers=["CPUExecutionProvider"])
    tok = Tokenizer.from_file(str(Path(spec["folder"]) / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(spec["max_length"])
    bs = spec["batch_size"]

    def batches(texts):
        encs = tok.encode_batch(texts)
        idx = np.argsort([-len(e.ids) for e in encs], kind="stable")
        for i in range(0, len(texts), bs):
            rows = idx[i:i + bs]
            L = max(len(encs[j].ids) for j in rows)
            ids = np.zeros((len(rows), L), np.int64)
            mask = np.zeros((len(rows), L), np.int64)
            for b, j in enumerate(rows):
                n = len(encs[j].ids)
                ids[b, :n], mask[b, :n] = encs[j].ids, 1
            yield rows, ids, mask

    def one(batch):
        rows, ids, mask = batch
        return rows, mask, sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]

    def run(texts):
        out = np.empty((len(texts), 0))
        if side_by_side:
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(spec["threads"]) as pool:
                done = list(pool.map(one, batches(texts)))
        else:
            done = map(one, batches(texts))
        for rows, mask, y in done:
            if spec["task"] == "embed":
                m = mask[..., None].astype(np.float32)
                y = (y * m).sum(1) / np.maximum(m.sum(1), 1e-9)
                y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
            else:
                e = np.exp(y.astype(np.float64) - y.max(1, keepdims=True))
                y = e / e.sum(1, keepdims=True)
            if out.shape[1] == 0:
                out = np.empty((len(texts), y.shape[1]), y.dtype)
            out[rows] = y
        return out

    def computed(texts):
        return sum(ids.size for _, ids, _ in batches(texts))
    return run, computed


def blas_in_use():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return [{k: d.get(k) for k in ("internal_api", "architecture", "version", "num_threads")}
            for d in threadpool_info() if d.get("user_api") == "blas"]


def worker(spec):
    texts = read_texts(spec["limit"])
    engine = spec["engine"]
    if engine == "export":
        return export_job(spec)
    run, computed = {"minifca": lambda: minifca_job(spec), "minifca-given": lambda: minifca_job(spec, True),
                     "minifca-one-at-a-time": lambda: minifca_job(spec, one_at_a_time=True),
                     "torch-loop": lambda: torch_job(spec, False), "torch-sorted": lambda: torch_job(spec, True),
                     "onnxruntime": lambda: ort_job(spec),
                     "onnxruntime-side-by-side": lambda: ort_job(spec, side_by_side=True)}[engine]()
    run(texts[:4 * spec["batch_size"]])                            # warm-up: compiles / loads caches, spins pools
    seconds, cpu, result = [], [], None
    for _ in range(spec["repeats"]):
        t, c = time.perf_counter(), time.process_time()
        result = run(texts)
        seconds.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    np.save(spec["result"], np.asarray(result, np.float64))
    return {"seconds": seconds, "cpu_seconds": cpu, "texts": len(texts), "computed_tokens": int(computed(texts)),
            "blas": blas_in_use() if engine.startswith("minifca") else None}


# ---------------------------------------------------------------- the parent: one fresh process per engine


def in_fresh_process(spec, threads, keep_openblas_env):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               NUMBA_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if not keep_openblas_env:
        env.pop("OPENBLAS_CORETYPE", None)
        env.pop("OPENBLAS_L2_SIZE", None)
    p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], check=False, env=env,
                       stdout=subprocess.PIPE,
                       text=True)
    if p.returncode != 0:
        return {"error": f"{spec['engine']} worker exited with {p.returncode}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_workload(args):
    import minifca
    texts = read_texts(args.limit)
    threads = args.threads or os.cpu_count()
    tasks = {"embed": (minifca.default_model_path(), "all-MiniLM-L6-v2"),
             "classify": (SST2_MODEL, "minilm-l6-sst2")}
    res = {"texts": len(texts), "batch_size": args.batch_size, "threads": threads, "repeats": args.repeats,
           "openblas_env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")},
           "openblas_env_kept": args.keep_openblas_env, "tasks": {}}
    tmp = Path(tempfile.mkdtemp(prefix="minifca-workload-"))
    for task, (folder, name) in tasks.items():
        ml = max_seq_length(folder) if task == "embed" else minifca.BertConfig.from_json(
            Path(folder) / "config.json").max_position_embeddings
        base = {"task": task, "folder": str(folder), "name": name, "limit": args.limit, "batch_size": args.batch_size,
                "threads": threads, "repeats": args.repeats, "max_length": ml, "onnx_dir": str(ROOT / "weights" / "workload")}
        if "onnxruntime" in args.engines and not onnx_path(base).is_file():
            log(f"{name}: exporting to ONNX")
            in_fresh_process(dict(base, engine="export"), threads, args.keep_openblas_env)
        rows = {}
        for e in args.engines:
            log(f"{name} ({task}): {e}")
            r = in_fresh_process(dict(base, engine=e, result=str(tmp / f"{task}-{e}.npy")), threads,
                                 args.keep_openblas_env)
            if "seconds" in r:
                r["median_seconds"] = float(np.median(r["seconds"]))
                r["median_cpu_seconds"] = float(np.median(r["cpu_seconds"]))
                r["texts_per_second"] = r["texts"] / r["median_seconds"]
                r["texts_per_cpu_second"] = r["texts"] / r["median_cpu_seconds"]
                r["values"] = np.load(tmp / f"{task}-{e}.npy")
                log(f"  {r['texts_per_second']:.0f} texts/s")
            rows[e] = r
        ref = rows.get("minifca", {}).get("values")
        real = sum(len(ids) for ids in _token_counts(folder, texts, ml))
        for e, r in rows.items():
            if "values" in r:
                v = r.pop("values")
                if ref is not None:
                    r["max_abs_diff_vs_minifca"] = float(np.abs(v - ref).max())
                    if task == "classify":
                        r["label_agreement_vs_minifca"] = float(np.mean(v.argmax(1) == ref.argmax(1)))
                for other in ("torch-loop", "onnxruntime"):
                    if rows.get(other, {}).get("texts_per_second"):
                        r[f"speedup_vs_{other}"] = r["texts_per_second"] / rows[other]["texts_per_second"]
                        r[f"cpu_speedup_vs_{other}"] = r["texts_per_cpu_second"] / rows[other]["texts_per_cpu_second"]
                r["padding_ratio"] = r["computed_tokens"] / real
        res["tasks"][task] = {"model": name, "real_tokens": real, "max_length": ml, "engines": rows}
    return res


def _token_counts(folder, texts, max_length):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length)
    return [e.ids for e in tok.encode_batch(texts)]


def print_report(res):
    env = res["openblas_env"]
    set_vars = ", ".join(f"{k}={v}" for k, v in env.items() if v)
    print(f"workload: the first {res['texts']} SST-2 train sentences, batch {res['batch_size']}, "
          f"{res['threads']} threads, median of {res['repeats']} timed pass(es) after a warm-up; "
          f"OpenBLAS override {'kept' if res['openblas_env_kept'] else 'unset for the workers'}"
          f"{f' (here: {set_vars})' if set_vars else ''}")
    for task, t in res["tasks"].items():
        blas = next((r["blas"] for r in t["engines"].values() if r.get("blas")), None)
        kernel = ", ".join(f"{b['internal_api']} {b['version']} {b['architecture']}" for b in blas) if blas else "?"
        print(f"\n== {task}: {t['model']} ({t['real_tokens']} tokens, truncated at {t['max_length']}; "
              f"NumPy BLAS: {kernel}) ==")
        print(f"{'engine':<38} {'texts/s':>8} {'seconds':>8} {'CPU s':>7} {'computed/real':>13} {'vs torch loop':>13} "
              f"{'vs ORT':>7} {'max|diff| vs minifca':>21}")
        for e, r in t["engines"].items():
            if "error" in r:
                print(f"{LABELS[e]:<38} {r['error']}")
                continue
            vt = (f"{r['speedup_vs_torch-loop']:.2f}x/{r['cpu_speedup_vs_torch-loop']:.2f}x"
                  if "speedup_vs_torch-loop" in r else "-")
            vo = (f"{r['speedup_vs_onnxruntime']:.2f}x/{r['cpu_speedup_vs_onnxruntime']:.2f}x"
                  if "speedup_vs_onnxruntime" in r else "-")
            agree = f" ({r['label_agreement_vs_minifca']:.1%} labels)" if "label_agreement_vs_minifca" in r else ""
            print(f"{LABELS[e]:<38} {r['texts_per_second']:8.0f} {r['median_seconds']:8.2f} {r['median_cpu_seconds']:7.2f} "
                  f"{r['padding_ratio']:12.2f}x {vt:>13} {vo:>11} {r.get('max_abs_diff_vs_minifca', 0):21.2e}{agree}")
    print("\nvs columns: wall-clock ratio / CPU-time ratio (the process's CPU seconds: on a loaded machine, with "
          "--threads 1, the fairer measure of the work each engine does)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=5000, help="how many SST-2 train sentences (default 5000)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1, help="timed passes per engine, after the warm-up (median)")
    p.add_argument("--threads", type=int, default=None, help="threads for every engine (default: all cores)")
    p.add_argument("--engines", nargs="+", default=DEFAULT_ENGINES, choices=ENGINES)
    p.add_argument("--keep-openblas-env", action="store_true", help="keep OPENBLAS_CORETYPE/_L2_SIZE for the workers")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    res = run_workload(args)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print_report(res)


if __name__ == "__main__":
    main()
