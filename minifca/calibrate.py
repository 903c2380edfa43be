"""`calibrate`: a gradient-free search for per-layer keep ratios that keeps agreement with the full model
highest under a FLOPs budget, on a sample of the training split."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .cluster import Serial
from .errors import ConfigError, InputError
from .evaluate import make_batches, predict, predict_many
from .fca import FCAConfig
from .reference import softmax
from .similarity import embedding_pass


def unit_embeddings(model, batches, fca):
    """The pass's embeddings [N, H] at unit length (data order), its FLOPs and the full model's: what
    `calibrate` compares on unlabelled text (agreement = the mean cosine to the full model's)."""
    emb, flops, full = embedding_pass(model, batches, fca)
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12), flops, full


def calibrate(model, data, target, base=None, step=0.2, floor=0.01, batch_size=64, refine=1, rules=(), start=None,
              log=print, objective="logits", runner=None):
    """Per-layer keep ratios maximising agreement with the full model on `data` with FLOPs <= target x full.

    Greedy descent from keeping everything (or from `start`): each step lowers one layer's ratio by `step` (later layers
    follow, ratios never increase) and takes the move that loses least (disagreement + mean KL to the full
    model's probabilities) per FLOP saved, until the budget is met. Then `refine` sweeps of coordinate moves
    at half the step (raise one layer, lower another, or just raise one) keep any that stays in budget and
    agrees more (ties: lower KL).
    base: an FCAConfig giving the rules (score, aggregate, clusters, ...); its keep is ignored.
    rules: other rules to try ({field: value} overrides of base, see `parse_rule`) at the keep the descent
    found, before the refinement; the one agreeing most within the budget is kept.
    objective "embeddings" (unlabelled text, any checkpoint): agreement is the mean cosine of each
    candidate's mean-pooled embeddings to the full model's, and the KL term is 0.
    runner: where the candidates' passes run (cluster.Serial here by default). A descent step's moves and the
    rules are evaluated together; the refinement, whose moves depend on the ones accepted before them,
    evaluates the next `runner.workers` moves at once and walks them in order, so that it accepts what the
    serial search accepts (its extra evaluations are counted in "evaluations"). The "embeddings" objective's
    passes run here.
    """
    runner = runner or Serial()
    base = (base or FCAConfig()).to_dict()
    layers = model.config.num_hidden_layers
    batches = make_batches(model, data, batch_size)
    if objective == "embeddings":
        e_full = unit_embeddings(model, batches, None)[0]             # [N, H] unit vectors
    else:
        p_full = softmax(predict(model, data, None, batches, None, runner=runner)["logits"])  # [N, C]
        full_pred = p_full.argmax(1)
    seen = {}

    rule = {}

    def key_of(keep, rule_):
        return tuple(round(v, 4) for v in keep), json.dumps(rule_, sort_keys=True)

    def score_many(cands):
        """[(keep, rule or None)] -> their results, the ones not seen yet run together."""
        keys = [key_of(keep, rule if r is None else r) for keep, r in cands]
        new = list(dict.fromkeys(k for k in keys if k not in seen))
        fcas = [FCAConfig(**{**base, **json.loads(k[1]), "keep": list(k[0])}) for k in new]
        if objective == "embeddings":
            for k, fca in zip(new, fcas):
                e, flops, full = unit_embeddings(model, batches, fca)
                seen[k] = {"keep": list(k[0]), "rule": json.loads(k[1]), "agreement": float((e * e_full).sum(1).mean()),
                           "kl": 0.0, "flops_ratio": flops / full}
            return [seen[k] for k in keys]
        for i, run in predict_many(model, data, fcas, batches, None, runner=runner):
            p = softmax(run["logits"])
            kl = float(np.mean(np.sum(p_full * (np.log(p_full + 1e-12) - np.log(p + 1e-12)), 1)))
            seen[new[i]] = {"keep": list(new[i][0]), "rule": json.loads(new[i][1]),
                            "agreement": float(np.mean(p.argmax(1) == full_pred)), "kl": kl,
                            "flops_ratio": run["flops"] / run["flops_full"]}
        return [seen[k] for k in keys]

    def lower(keep, layer, by):
        new = list(keep)
        new[layer] = round(max(keep[layer] - by, floor), 4)
        return [min(v, new[layer]) if j > layer else v for j, v in enumerate(new)]

    def raise_(keep, layer, by):
        new = list(keep)
        new[layer] = round(min(keep[layer] + by, 1.0), 4)
        return [max(v, new[layer]) if j < layer else v for j, v in enumerate(new)]

    loss = lambda r: (1 - r["agreement"]) + r["kl"]
    cur = score_many([(list(start) if start is not None else [1.0] * layers, None)])[0]
    log(f"start: keep {cur['keep']}  FLOPs {cur['flops_ratio']:.3f}  agreement {cur['agreement']:.4f}  "
        f"KL {cur['kl']:.4f}")
    while cur["flops_ratio"] > target:
        moves = score_many([(lower(cur["keep"], layer, step), None) for layer in range(layers)
                            if cur["keep"][layer] > floor])
        moves = [m for m in moves if m["flops_ratio"] < cur["flops_ratio"]]
        if not moves:
            break
        saved = lambda m, cur=cur: cur["flops_ratio"] - m["flops_ratio"]
        cur = min(moves, key=lambda m, cur=cur: ((loss(m) - loss(cur)) / saved(m), -saved(m)))
        log(f"descent: keep {cur['keep']}  FLOPs {cur['flops_ratio']:.3f}  agreement {cur['agreement']:.4f}  "
            f"KL {cur['kl']:.4f}")
    if cur["flops_ratio"] > target:
        raise ConfigError(f"calibrate: even keep {cur['keep']} costs {cur['flops_ratio']:.3f} of the full model, "
                          f"above the target {target}")
    better = lambda m, c: (m["agreement"], -m["kl"]) > (c["agreement"], -c["kl"])
    for r, m in zip(rules, score_many([(cur["keep"], r) for r in rules])):  # every rule at the same keep
        log(f"rule {r}: FLOPs {m['flops_ratio']:.3f}  agreement {m['agreement']:.4f}  KL {m['kl']:.4f}")
        if m["flops_ratio"] <= target and better(m, cur):
            cur, rule = m, r
    fine = step / 2
    moves = [(up, down) for up in range(layers) for down in [None] + list(range(layers)) if down != up]

    def move(keep, up, down):
        keep = raise_(keep, up, fine)
        return keep if down is None else lower(keep, down, fine)

    for sweep in range(refine):
        improved, at = False, 0
        while at < len(moves):                           # the next moves from `cur`, run together, walked in order
            block, nxt = [], at
            while nxt < len(moves) and len(block) < runner.workers:
                keep = move(cur["keep"], *moves[nxt])
                nxt += 1
                if keep != cur["keep"]:
                    block.append((nxt, keep))
            at = nxt
            for (after, _), m in zip(block, score_many([(keep, None) for _, keep in block])):
                if m["flops_ratio"] <= target and better(m, cur):
                    cur, improved, at = m, True, after   # the moves after it start again from the new `cur`
                    log(f"refine {sweep + 1}: keep {cur['keep']}  FLOPs {cur['flops_ratio']:.3f}  "
                        f"agreement {cur['agreement']:.4f}  KL {cur['kl']:.4f}")
                    break
        if not improved:
            break
    cfg = FCAConfig(**{**base, **rule, "keep": cur["keep"]})
    return cfg, {**cur, "evaluations": len(seen)}


def parse_rule(spec: str) -> dict:
    """'score+aggregate[-clusters][+prop]' (e.g. cls_attention+similarity-2+prop) -> FCAConfig overrides."""
    parts = spec.split("+")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "prop"):
        raise ConfigError(f"rule {spec!r}: write score+aggregate[-clusters][+prop], e.g. attention_received+weighted")
    agg, _, c = parts[1].partition("-")
    if c and not c.isdigit():
        raise ConfigError(f"rule {spec!r}: the clusters after '-' must be a number, e.g. {parts[0]}+{agg}-2")
    return {"score": parts[0], "aggregate": agg, "clusters": int(c) if c else 1,
            "proportional_attention": len(parts) == 3}


def least_sure(model, data, n, batch_size=64, runner=None) -> np.ndarray:
    """Indices (in data order) of the n examples with the smallest margin between the full model's top two logits."""
    logits = predict(model, data, None, make_batches(model, data, batch_size), None, runner=runner)["logits"]  # [N, C]
    top2 = np.sort(logits, 1)[:, -2:]                                # [N, 2]
    return np.sort(np.argsort(top2[:, 1] - top2[:, 0], kind="stable")[:n])


DEV_NAMES = ("dev", "validation", "test")



def check_training_data(data):
    """calibrate searches on training data: refuse files named like a dev/validation/test split."""
    for f in data.source.split(", "):
        if Path(f).name.lower().startswith(DEV_NAMES):
            raise InputError(f"{f}: calibrate searches on training data; this looks like a dev/validation/test "
                             "file, and calibrating on it would leak into the evaluation")
