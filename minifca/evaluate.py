"""One pass of a model over a labelled data set, and `evaluate`: accuracy, agreement, FLOPs, speed.

    predict    one pass of a model (plain or FCA) over a data set: logits and FLOPs (both baselines);
               batches of similar length; each batch's results appended to a cache file as it comes,
               so an interrupted run resumes where it stopped
    evaluate   accuracy, agreement with the full model, FLOPs, examples/s (evaluate_many: several configurations)
Every pass is cut into tasks, one (configuration, shard of batches) each (`forward_shard`), that a runner runs:
here in order (minifca.cluster.Serial, the default) or on a Dask cluster (minifca.cluster.connect).
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


def forward_shard(model, shard, fca, pad_to):
    """The unit of work of every pass, here or on a cluster's worker: one FCA configuration (None = the full
    model) over one shard of batches [(batch number, Encoding)]: per batch its logits [b, C] (float64) and FLOPs."""
    res = []
    for b, enc in shard:
        t = time.perf_counter()
        out = model(enc, fca=fca, pad_to=pad_to)
        res.append({"batch": b, "logits": out.logits.astype(np.float64), "flops": out.flops,
                    "flops_full": out.flops_full, "flops_full_padded": out.flops_full_padded,
                    "seconds": time.perf_counter() - t})
    return res


def predict_many(model, data, fcas, batches, pad_to=64, cache_dir=None, runner=None, progress=False, desc="",
                 shard_batches=1):
    """Yield (i, pass) for every configuration fcas[i] (None = the full model) as its last shard comes, a pass
    being what `predict` returns. Each (configuration, shard of `shard_batches` batches) is one task of
    `runner` (cluster.Serial(), the default, runs them here in order: fcas[0] first, then fcas[1], ...).
    With cache_dir each batch's result is appended to cache_dir/<key>.jsonl as it comes, and batches already
    there are not run again: an interrupted run resumes where it stopped."""
    from .cluster import Serial
    if "classifier" not in model.params:
        raise CheckpointError(f"{model.path}: evaluating on labelled data needs a checkpoint with a classifier head "
                              "(classifier.*)")
    runner = runner or Serial()
    caches = [None] * len(fcas)
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        caches = [Path(cache_dir) / f"{run_key(model, data, fca, batches, pad_to)}.jsonl" for fca in fcas]
    done = [_read_cache(c, batches, model.config.num_labels) for c in caches]  # per configuration: {batch: result}
    shards = [list(range(b, min(b + shard_batches, len(batches)))) for b in range(0, len(batches), shard_batches)]
    tasks = [(i, j) for i in range(len(fcas)) for j, shard in enumerate(shards) if any(b not in done[i] for b in shard)]
    left = [sum(t[0] == i for t in tasks) for i in range(len(fcas))]
    bar = progress_bar(len(data) * len(fcas), desc, None if progress else False, unit="ex")  # on a terminal only
    bar.update(sum(len(batches[b][0]) for d in done for b in d))
    for i in range(len(fcas)):
        if not left[i]:
            yield i, _assemble(batches, done[i])
    shared = {}
    for j in sorted({j for _, j in tasks}):
        shared[j] = runner.share([(b, _arrays_only(batches[b][1])) for b in shards[j]])
    results = runner.map(forward_shard, model, [(shared[j], fcas[i], pad_to) for i, j in tasks])
    try:
        for t, res in results:
            i = tasks[t][0]
            if caches[i] is not None:
                with open(caches[i], "a") as f:
                    f.write("".join(json.dumps({**r, "logits": r["logits"].tolist()}) + "\n" for r in res))
            for r in res:
                done[i][r["batch"]] = r
                bar.update(len(batches[r["batch"]][0]))
            left[i] -= 1
            if not left[i]:
                yield i, _assemble(batches, done[i])
    finally:                                                         # also when the caller stops early: a cluster
        results.close()                                              # cancels the tasks left
        bar.close()


def _arrays_only(enc):
    """A batch as a task carries it: its arrays without the token strings."""
    from .tokenizer import Encoding
    return Encoding(enc.input_ids, enc.attention_mask, enc.token_type_ids)


def _read_cache(path, batches, n_labels) -> dict:
    """{batch: result} from a pass's cache file (none: {}). A line that is not a whole result of one of
    `batches` (cut by an interruption, edited, garbled: no logits, the wrong shape) is recomputed, not trusted."""
    done = {}
    if path is not None and path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                r = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                continue
            if _cached_batch_ok(r, batches, n_labels):
                done[r["batch"]] = {**r, "cached": True}            # not computed (nor timed) by this run
    return done


CACHED_NUMBERS = ("flops", "flops_full", "flops_full_padded", "seconds")


def _cached_batch_ok(r, batches, n_labels) -> bool:
    """Is a cache line a whole result of one of `batches`: its index, finite logits [b, n_labels], the numbers?"""
    if not isinstance(r, dict) or not isinstance(r.get("batch"), int) or not 0 <= r["batch"] < len(batches):
        return False
    if not all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for k in CACHED_NUMBERS):
        return False
    try:
        logits = np.array(r.get("logits"), dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return logits.shape == (len(batches[r["batch"]][0]), n_labels) and bool(np.isfinite(logits).all())


def _assemble(batches, done) -> dict:
    """One pass from its batches' results: logits [N, C] back in the data's order, FLOPs summed, and the
    seconds of the batches this run computed (examples_timed of them; cached ones were timed by another run)."""
    total = {"flops": 0, "flops_full": 0, "flops_full_padded": 0}
    for b in range(len(batches)):
        for k in total:
            total[k] += done[b][k]
    fresh = [b for b in range(len(batches)) if not done[b].get("cached")]
    total["seconds"] = float(sum(done[b]["seconds"] for b in fresh))
    total["examples_timed"] = int(sum(len(batches[b][0]) for b in fresh))
    order = np.concatenate([i for i, _ in batches])
    logits = np.concatenate([np.asarray(done[b]["logits"], np.float64) for b in range(len(batches))])
    res = np.empty_like(logits)
    res[order] = logits                                              # back to the data's order
    return {"logits": res, **total}


def predict(model, data, fca, batches, pad_to=64, cache_dir=None, progress=False, desc="", runner=None):
    """Logits [N, C] and summed FLOPs/seconds of one pass. With cache_dir, each batch's result is appended
    to cache_dir/<key>.jsonl as it comes and batches already there are not run again."""
    for _, run in predict_many(model, data, [fca], batches, pad_to, cache_dir, runner, progress, desc):
        return run


def summarize(run, labels, full_pred=None) -> dict:
    pred = run["logits"].argmax(1)
    n = len(pred)
    return {"accuracy": float(np.mean(pred == labels)),
            "agreement": 1.0 if full_pred is None else float(np.mean(pred == full_pred)),
            "flops": int(run["flops"]), "flops_full": int(run["flops_full"]),
            "flops_full_padded": int(run["flops_full_padded"]),
            "flops_ratio": run["flops"] / run["flops_full"], "flops_ratio_padded": run["flops"] / run["flops_full_padded"],
            "examples": n, "seconds": run["seconds"], "examples_timed": run["examples_timed"],
            "examples_per_second": run["examples_timed"] / max(run["seconds"], 1e-9) if run["examples_timed"] else None}


# ---------------------------------------------------------------- eval


def evaluate(model, data, fca=None, batch_size=64, pad_to=64, max_length=None, cache_dir=None, progress=False,
             runner=None):
    """accuracy, agreement with the full model, FLOPs (both baselines), examples, seconds (+ the full model's)."""
    return evaluate_many(model, data, [fca], batch_size, pad_to, max_length, cache_dir, progress, runner)[0]


def evaluate_many(model, data, fcas, batch_size=64, pad_to=64, max_length=None, cache_dir=None, progress=False,
                  runner=None):
    """`evaluate` of each configuration in fcas (None = the full model), in that order; the full model's pass
    is made once, and on a cluster (runner) every pass at once."""
    labels = label_ids(data.labels, model.config, data.source)
    batches = make_batches(model, data, batch_size, max_length)
    todo = [None] + [f for f in fcas if f is not None]
    runs = dict(predict_many(model, data, todo, batches, pad_to, cache_dir, runner, progress,
                             "full model" if len(todo) == 1 else f"full model + {len(todo) - 1} FCA"))
    full_pred = runs[0]["logits"].argmax(1)
    out, n = [], 0
    for fca in fcas:
        n += fca is not None
        res = summarize(runs[n if fca is not None else 0], labels, full_pred)
        res.update({"accuracy_full": float(np.mean(full_pred == labels)), "seconds_full": runs[0]["seconds"],
                    "examples_timed_full": runs[0]["examples_timed"],
                    "model": str(model.path), "data": data.source, "backend": model.backend, "pad_to": pad_to,
                    "fca": None if fca is None else fca.to_dict()})
        out.append(res)
    return out
