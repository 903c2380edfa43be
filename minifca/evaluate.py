"""One pass of a model over a labelled data set, and `evaluate`: accuracy, agreement, FLOPs, speed.

    predict    one pass of a model (plain or FCA) over a data set: logits and FLOPs (both baselines);
               batches of similar length; each batch's results appended to a cache file as it comes,
               so an interrupted run resumes where it stopped
    evaluate   accuracy, agreement with the full model, FLOPs, examples/s
The data sets come from `minifca.data`; the grid of rules is `minifca.ablate`, the schedule search
`minifca.calibrate`.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from .data import label_ids
from .errors import CheckpointError, ConfigError
from .progress import progress as progress_bar

def make_batches(model, data, batch_size=64, max_length=None):
    """[(indices, Encoding)]: examples sorted by token count (less padding), each batch trimmed to its longest."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    enc = model.tokenize(data.texts, data.pairs, max_length=max_length)
    order = np.argsort(enc.attention_mask.sum(1), kind="stable")    # [N] shortest first
    return [(idx, enc[idx]) for idx in (order[i:i + batch_size] for i in range(0, len(order), batch_size))]


def run_key(model, data, fca, batches, pad_to) -> str:
    """What a pass depends on: model, data, FCA configuration, batching, padded length."""
    spec = {"model": str(model.path), "backend": model.backend, "data": data.source, "n": len(data),
            "fca": None if fca is None else fca.to_dict(), "batches": [len(i) for i, _ in batches], "L": [e.input_ids.shape[1] for _, e in batches], "pad_to": pad_to}
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def predict(model, data, fca, batches, pad_to=64, cache_dir=None, progress=False, desc=""):
    """Logits [N, C] and summed FLOPs/seconds of one pass. With cache_dir, each batch's result is appended
    to cache_dir/<key>.jsonl as it comes and batches already there are not run again."""
    if "classifier" not in model.params:
        raise CheckpointError(f"{model.path}: evaluating on labelled data needs a checkpoint with a classifier head "
                              "(classifier.*)")
    done = {}
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"{run_key(model, data, fca, batches, pad_to)}.jsonl"
        cache.parent.mkdir(parents=True, exist_ok=True)
        if cache.exists():
            for line in cache.read_text().splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # a line cut by an interruption
                    continue
                done[r["batch"]] = r
    logits = [None] * len(batches)
    total = {"flops": 0, "flops_full": 0, "flops_full_padded": 0, "seconds": 0.0}
    bar = progress_bar(len(data), desc, None if progress else False, unit="ex")  # on a terminal only
    for b, (idx, enc) in enumerate(batches):
        r = done.get(b)
        if r is None:
            t = time.perf_counter()
            out = model(enc, fca=fca, pad_to=pad_to)
            r = {"batch": b, "logits": out.logits.astype(np.float64).tolist(), "flops": out.flops,
                 "flops_full": out.flops_full, "flops_full_padded": out.flops_full_padded,
                 "seconds": time.perf_counter() - t}
            if cache is not None:
                with open(cache, "a") as f:
                    f.write(json.dumps(r) + "\n")
        logits[b] = np.array(r["logits"])
        for k in total:
            total[k] += r[k]
        bar.update(len(idx))
    bar.close()
    order = np.concatenate([i for i, _ in batches])
    res = np.empty((len(order), logits[0].shape[1]))
    res[order] = np.concatenate(logits)                             # back to the data's order
    return {"logits": res, **total}


def summarize(run, labels, full_pred=None) -> dict:
    pred = run["logits"].argmax(1)
    n = len(pred)
    return {"accuracy": float(np.mean(pred == labels)),
            "agreement": 1.0 if full_pred is None else float(np.mean(pred == full_pred)),
            "flops": int(run["flops"]), "flops_full": int(run["flops_full"]),
            "flops_full_padded": int(run["flops_full_padded"]),
            "flops_ratio": run["flops"] / run["flops_full"], "flops_ratio_padded": run["flops"] / run["flops_full_padded"],
            "examples": n, "seconds": run["seconds"], "examples_per_second": n / max(run["seconds"], 1e-9)}


# ---------------------------------------------------------------- eval


def evaluate(model, data, fca=None, batch_size=64, pad_to=64, max_length=None, cache_dir=None, progress=False):
    """accuracy, agreement with the full model, FLOPs (both baselines), examples, seconds (+ the full model's)."""
    labels = label_ids(data.labels, model.config, data.source)
    batches = make_batches(model, data, batch_size, max_length)
    full = predict(model, data, None, batches, pad_to, cache_dir, progress, "full model")
    full_pred = full["logits"].argmax(1)
    run = full if fca is None else predict(model, data, fca, batches, pad_to, cache_dir, progress, "FCA")
    res = summarize(run, labels, full_pred)
    res.update({"accuracy_full": float(np.mean(full_pred == labels)), "seconds_full": full["seconds"],
                "model": str(model.path), "data": data.source, "backend": model.backend, "pad_to": pad_to,
                "fca": None if fca is None else fca.to_dict()})
    return res

