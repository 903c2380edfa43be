"""One text through FCA, layer by layer: `picture` collects a traced forward into a per-layer table
(which tokens stay fine units, which merge into coarse units, with their weights) and `print_picture`
draws it. `minifca explain` and `minifca demo` print it; tutorial 3 walks through it."""
from __future__ import annotations

from .fca import FCAConfig
from .flops import flops_per_layer


def picture(model, text, fca, max_length=None):
    """One text through FCA, layer by layer: JSON-able dict with, per layer, every unit
    (kind fine/coarse, the input tokens it holds with their weights, size) and the dropped tokens."""
    enc = model.tokenize([text], max_length=max_length)
    out = model(enc, fca=fca, trace=True)
    tokens = enc.tokens[0]
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
    print(f"\"{pic['text']}\" -> {len(tokens)} tokens; FCA {FCAConfig.from_dict(f).describe()}")
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

