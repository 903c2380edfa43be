"""`minifca run`: classify (classifier head) or embed (encoder only) texts from arguments or stdin."""
from __future__ import annotations

import sys
import time

import numpy as np

from ..reference import softmax
from .common import add_json, emit, fca_from_args, load_model


def run_texts(model, texts, fca, max_length=None):
    """Classify (classifier head) or embed (encoder only) `texts`; return a JSON-able dict."""
    enc = model.tokenize(texts, max_length=max_length)
    t = time.perf_counter()
    out = model(enc, fca=fca)
    seconds = time.perf_counter() - t
    res = {"model": str(model.path), "backend": model.backend, "fca": None if fca is None else fca.to_dict(),
           "flops": out.flops, "flops_full": out.flops_full, "seconds": seconds}
    if out.logits is not None and out.logits.ndim == 2:
        probs = softmax(out.logits.astype(np.float64))
        labels = model.config.id2label
        res["predictions"] = [{"text": t, "label": labels[int(p.argmax())],
                               "probabilities": {labels[i]: float(v) for i, v in enumerate(p)}}
                              for t, p in zip(texts, probs)]
    else:
        emb = out.embeddings
        unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        res["embeddings"] = [{"text": t, "norm": float(np.linalg.norm(e))} for t, e in zip(texts, emb)]
        res["similarity"] = (unit @ unit.T).round(6).tolist()
    return res


def print_run(res):
    if "predictions" in res:
        for p in res["predictions"]:
            probs = "  ".join(f"{k}={v:.4f}" for k, v in p["probabilities"].items())
            print(f"{p['label']:>10}  {probs}  {p['text']}")
    else:
        for i, e in enumerate(res["embeddings"]):
            print(f"[{i}] norm {e['norm']:.4f}  {e['text']}")
        sim = np.array(res["similarity"])
        print("cosine similarity:")
        print("     " + " ".join(f"[{j}]".rjust(7) for j in range(len(sim))))
        for i, row in enumerate(sim):
            print(f"[{i}]  " + " ".join(f"{v:7.4f}" for v in row))
    ratio = res["flops"] / res["flops_full"]
    print(f"FLOPs {res['flops'] / 1e9:.3f} G ({ratio:.1%} of the full model), {res['seconds'] * 1e3:.1f} ms")


def cmd_run(args):
    model = load_model(args)
    fca = fca_from_args(args, model.config.num_hidden_layers)
    texts = args.text if args.text else [line.rstrip("\n") for line in sys.stdin if line.strip()]
    res = run_texts(model, texts, fca, args.max_length)
    if not emit(res, args.json):
        print_run(res)


def register(subparsers, parents):
    p = subparsers.add_parser("run", parents=[parents["model"], parents["fca"]], help="classify or embed texts",
                              description="Labels and probabilities (classifier checkpoints) or embedding norms and "
                                          "cosine similarities (encoder-only checkpoints). Texts from arguments or "
                                          "stdin.")
    p.add_argument("text", nargs="*", help="texts to run (default: one per line from stdin)")
    add_json(p)
    p.set_defaults(func=cmd_run)
