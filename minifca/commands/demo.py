"""`minifca demo`: the main job on the embedded default checkpoint, with and without FCA."""
from __future__ import annotations

import numpy as np

from ..explain import picture, print_picture
from ..fca import FCAConfig
from .common import add_json, emit, fca_from_args, load_model, texts_from
from .run import run_texts

DEMO_SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar in front of an audience.",
    "The new phone has a remarkably long battery life.",
    "This smartphone's battery lasts for days.",
    "It is going to rain heavily in the city tomorrow.",
    "A woman is slicing tomatoes in the kitchen.",
]
DEMO_FCA_KEEP = 0.5


def cmd_demo(args, repeats=5):
    model = load_model(args)
    fca = fca_from_args(args, model.config.num_hidden_layers) or FCAConfig(keep=DEMO_FCA_KEEP)
    texts = texts_from(args.text) if args.text else DEMO_SENTENCES
    # steady state: each warms up with one forward (Numba's compile or cache load), then the median of `repeats`
    full = run_texts(model, texts, None, args.max_length, batch_size=len(texts), repeats=repeats)
    red = run_texts(model, texts, fca, args.max_length, batch_size=len(texts), repeats=repeats)
    pic = picture(model, texts[0], fca, args.max_length)
    res = {"model": full["model"], "backend": model.backend, "fca": fca.to_dict(), "full": full, "fca_run": red,
           "flops_ratio": red["flops"] / full["flops"], "time_ratio": red["seconds"] / full["seconds"],
           "picture": pic}
    if emit(res, args.json):
        return
    print(f"minifca demo — {full['model']} ({model.backend} backend)")
    print(f"FCA: {fca.describe()} (change with --fca-* flags)\n")
    if "similarity" in full:
        a, b = np.array(full["similarity"]), np.array(red["similarity"])
        print("cosine similarity of each sentence with the next one, full model vs FCA:")
        for i in range(len(texts)):
            j = (i + 1) % len(texts)
            print(f"  [{i}]~[{j}]  full {a[i, j]:.4f}  FCA {b[i, j]:.4f}  ({b[i, j] - a[i, j]:+.4f})  {texts[i]}")
        off = ~np.eye(len(a), dtype=bool)
        print(f"largest change over all {off.sum() // 2} pairs: {np.abs(a - b)[off].max():.4f}; "
              f"nearest neighbour unchanged for {np.mean(np.where(off, a, -2).argmax(1) == np.where(off, b, -2).argmax(1)):.0%} "
              "of the sentences")
    else:
        print("predictions, full model vs FCA:")
        for p, q in zip(full["predictions"], red["predictions"]):
            pf, pq = max(p["probabilities"].values()), max(q["probabilities"].values())
            print(f"  full {p['label']:>10} {pf:.3f}   FCA {q['label']:>10} {pq:.3f}   {p['text']}")
        agree = np.mean([p["label"] == q["label"] for p, q in zip(full["predictions"], red["predictions"])])
        print(f"predictions agreeing with the full model: {agree:.0%}")
    print(f"FLOPs: {red['flops'] / 1e6:.1f} M with FCA vs {full['flops'] / 1e6:.1f} M full "
          f"({1 - res['flops_ratio']:.1%} saved)")
    print(f"time:  {red['seconds'] * 1e3:.1f} ms with FCA vs {full['seconds'] * 1e3:.1f} ms full "
          f"({res['time_ratio']:.0%} of the full model's time)\n"
          f"       each the {full['timed']}; the forward only, tokenization excluded\n")
    print("one sentence, layer by layer:")
    print_picture(pic)



def register(subparsers, parents):
    p = subparsers.add_parser("demo", parents=[parents["model"], parents["fca"]],
                              help="the main job on the embedded default checkpoint, with and without FCA",
                              description="Runs sentences with and without FCA on all-MiniLM-L6-v2 (or --model): "
                                          "similarities/predictions side by side, FLOPs and time saved, and one "
                                          "sentence shrinking layer by layer.")
    p.add_argument("text", nargs="*", help="sentences (default: a built-in set)")
    add_json(p)
    p.set_defaults(func=cmd_demo)
