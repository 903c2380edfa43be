"""`minifca run`: classify (classifier head), tag tokens (token classifier) or embed (encoder only) texts
from arguments or stdin."""
from __future__ import annotations

import time

import numpy as np

from ..bench import times_ms
from ..progress import progress
from ..reference import softmax
from ..sentence import l2_normalize, pool
from .common import add_json, emit, fca_from_args, int_at_least, load_model, texts_from

MAX_SIMILARITY = 100   # texts whose all-pairs cosine similarity `run` reports (more: `minifca embed` to a file)


def run_texts(model, texts, fca, max_length=None, batch_size=32, repeats=3, show_progress_bar=None):
    """Classify (classifier head) or embed (encoder only) `texts` in batches sorted by length; a JSON-able
    dict with the results in input order, the FLOPs, and the forwards' steady-state time: one warm-up
    forward first (Numba's compile or cache load, first-touch of the weights), then a single batch is
    timed `repeats` times (the median is reported), several batches once each (their sum)."""
    classifier = "classifier" in model.params
    inputs = (texts, max_length, None) if classifier else model.sentence_inputs(texts, max_length)  # + max_seq_length
    batches = list(model.batches(*inputs[:1], batch_size=batch_size, max_length=inputs[1], truncation=inputs[2]))
    model(batches[0][1], fca=fca)                                    # warm-up, not timed
    n = len(texts)
    vals = np.empty((n, model.config.num_labels if classifier else model.config.hidden_size))
    flops = flops_full = 0
    times = []
    with progress(n, "run", show_progress_bar if len(batches) > 1 else False) as bar:
        for rows, enc in batches:
            t = time.perf_counter()
            out = model(enc, fca=fca)
            times.append(time.perf_counter() - t)
            flops, flops_full = flops + out.flops, flops_full + out.flops_full
            vals[rows] = (softmax(out.logits.astype(np.float64)) if classifier else
                          pool(out.last_hidden_state, out.mask, out.sizes, model.sentence.pooling))
            bar.update(len(rows))
    if len(batches) == 1:
        times += [ms / 1e3 for ms in times_ms(lambda: model(batches[0][1], fca=fca), repeats - 1, warmup=0)]
        seconds = float(np.median(times))
        timed = f"median of {len(times)} forwards of the one batch of {n}, after a warm-up forward"
    else:
        seconds = float(np.sum(times))
        timed = (f"one pass over {len(batches)} batches of up to {batch_size} after a warm-up forward; "
                 f"median batch {np.median(times) * 1e3:.1f} ms")
    res = {"model": str(model.path), "backend": model.backend, "fca": None if fca is None else fca.to_dict(),
           "flops": flops, "flops_full": flops_full, "seconds": seconds, "timed": timed, "batches": len(batches)}
    if classifier:
        labels = model.config.id2label
        res["predictions"] = [{"text": t, "label": labels[int(p.argmax())],
                               "probabilities": {labels[i]: float(v) for i, v in enumerate(p)}}
                              for t, p in zip(texts, vals)]
    else:
        unit = l2_normalize(vals)
        res["embeddings"] = [{"text": t, "norm": float(np.linalg.norm(e))} for t, e in zip(texts, vals)]
        res["similarity"] = (unit @ unit.T).round(6).tolist() if n <= MAX_SIMILARITY else None
    return res


def tag_texts(model, texts, fca, max_length=None):
    """A token classifier's (BertForTokenClassification's) label for every token of `texts`: a JSON-able
    dict with, per text, [[token, label], ...] (special tokens included). FCA is refused by the forward:
    it merges the tokens that need labels."""
    enc = model.tokenize(texts, max_length=max_length)
    out = model(enc, fca=fca)
    labels = model.config.id2label
    tags = out.logits.argmax(-1)                                     # [B, L] class of each token
    return {"model": str(model.path), "backend": model.backend, "fca": None, "flops": out.flops,
            "flops_full": out.flops_full,
            "tags": [{"text": t, "tokens": [[tok, labels[int(c)]] for tok, c in zip(toks, row)]}
                     for t, toks, row in zip(texts, enc.tokens, tags)]}


def print_run(res):
    if "tags" in res:
        for r in res["tags"]:
            print(r["text"])
            print("  " + " ".join(f"{tok}/{label}" for tok, label in r["tokens"]))
        print(f"FLOPs {res['flops'] / 1e9:.3f} G")
        return
    if "predictions" in res:
        for p in res["predictions"]:
            probs = "  ".join(f"{k}={v:.4f}" for k, v in p["probabilities"].items())
            print(f"{p['label']:>10}  {probs}  {p['text']}")
    else:
        for i, e in enumerate(res["embeddings"]):
            print(f"[{i}] norm {e['norm']:.4f}  {e['text']}")
        if res["similarity"] is None:
            print(f"(cosine similarities shown for up to {MAX_SIMILARITY} texts; minifca embed writes vectors to a file)")
        elif len(res["similarity"]) <= 12:
            sim = np.array(res["similarity"])
            print("cosine similarity:")
            print("     " + " ".join(f"[{j}]".rjust(7) for j in range(len(sim))))
            for i, row in enumerate(sim):
                print(f"[{i}]  " + " ".join(f"{v:7.4f}" for v in row))
        else:
            print("(cosine similarities of more than 12 texts: see --json)")
    ratio = res["flops"] / res["flops_full"]
    print(f"FLOPs {res['flops'] / 1e9:.3f} G ({ratio:.1%} of the full model); forward time {res['seconds'] * 1e3:.1f} ms "
          f"for the {len(res.get('predictions') or res['embeddings'])} texts, steady state ({res['timed']}; "
          "tokenization excluded)")


def cmd_run(args):
    model = load_model(args)
    fca = fca_from_args(args, model.config.num_hidden_layers)
    texts = texts_from(args.text)
    if "token_classifier" in model.params:
        res = tag_texts(model, texts, fca, args.max_length)
    else:
        res = run_texts(model, texts, fca, args.max_length, args.batch_size)
    if not emit(res, args.json):
        print_run(res)


def register(subparsers, parents):
    p = subparsers.add_parser("run", parents=[parents["model"], parents["fca"]], help="classify or embed texts",
                              description="Labels and probabilities (classifier checkpoints), a label per token "
                                          "(token classifiers), or embedding norms and cosine similarities "
                                          "(encoder-only checkpoints). Texts from arguments or stdin.")
    p.add_argument("text", nargs="*", help="texts to run (default: one per line from stdin)")
    p.add_argument("--batch-size", type=int_at_least(1), default=32,
                   help="texts per forward, sorted by length first (default 32)")
    add_json(p)
    p.set_defaults(func=cmd_run)
