"""The backward pass of the reference forward, by hand, in NumPy: what training (`distill`) runs on.

Each `*_forward` here runs the reference's forward (`reference.py` is the specification; its
functions are called, not copied, wherever they return what the backward needs) and returns
its output together with a `cache`: what its `*_backward` reads. Each `*_backward` sits right
below its forward, takes the gradient of the loss with respect to the forward's output and
returns the gradients with respect to its inputs and parameters, in the parameters' own
nested layout ({"w", "b"} for a linear layer, {"g", "b"} for a LayerNorm, ...).

Shapes as in reference.py: B batch, L tokens, n units, H hidden, h heads, d = H / h,
I intermediate, C classes. Training adds dropout (hidden and attention, seeded by `rng`).

The training forward is reference.bert_forward itself, the package's one loop over layers, run with
a `Tape` as its ops: the ops contract (minifca/kernels/__init__.py), each op the reference's or its
`*_forward` here plus dropout, recording per layer what `layer_backward` reads; `backward` walks
those records in reverse.

FCA in training: the selection of fine units is discrete and gets no gradient. A fine unit is
a copy (a gather: its gradient scatters back to the unit it copies); a coarse unit is a
weighted sum sum_j w_j x_j (its gradient goes to each member, and, where the weights are a
softmax of the scores — `weighted`, `clusters` — through the softmax to the scores, and from
the scores to the head-averaged attention probabilities they were computed from).
Sizes and proportional attention's log sizes are counts: no gradient.

    out, cache = forward(params, cfg, ids, mask, tt, fca=fca, dropout=0.1, rng=rng)
    loss, d_logits = cross_entropy(out["logits"], labels)
    grads, d_inputs = backward(params, cfg, cache, {"logits": d_logits})
"""
from __future__ import annotations

import sys

import numpy as np

from . import fca as fca_mod, reference as ref
from .errors import ConfigError

# ---------------------------------------------------------------- dropout


def dropout_forward(x, p, rng):
    """Inverted dropout: zero each entry with probability p, scale the rest by 1 / (1 - p)."""
    if not p or rng is None:
        return x, None
    keep = (rng.random(x.shape, dtype=np.float32) >= p).astype(x.dtype) / x.dtype.type(1 - p)  # [...]
    return x * keep, keep                                            # [...]


def dropout_backward(dy, keep):
    return dy if keep is None else dy * keep                         # [...]


# ---------------------------------------------------------------- activations
# d/dx of reference.ACTIVATIONS, each from the forward's own input x.


def gelu_backward(dy, x):
    """d/dx x Phi(x) = Phi(x) + x phi(x) (Phi from the reference's erf)."""
    cdf = 0.5 * (1.0 + ref.erf(x * np.float32(0.7071067811865476)))  # [...] the forward's constants
    pdf = np.exp(-0.5 * x * x) * x.dtype.type(0.3989422804014327)    # [...]
    return dy * (cdf + x * pdf)                                      # [...]


def gelu_new_backward(dy, x):
    c, a = np.float32(0.7978845608028654), np.float32(0.044715)     # the forward's constants
    t = np.tanh(c * (x + a * x ** 3))                                # [...]
    # a * x first: (3.0 * a) would be a float32 product, rounded (2.8e-8 relative) even on float64 arrays
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * (a * x * x)))  # [...]


def relu_backward(dy, x):
    return dy * (x > 0)                                              # [...]


def silu_backward(dy, x):
    s = 1.0 / (1.0 + np.exp(-x))                                     # [...] sigmoid
    return dy * (s * (1.0 + x * (1.0 - s)))                          # [...]


ACTIVATION_BACKWARDS = {"gelu": gelu_backward, "gelu_new": gelu_new_backward, "gelu_pytorch_tanh": gelu_new_backward,
                        "gelu_fast": gelu_new_backward, "relu": relu_backward, "silu": silu_backward,
                        "swish": silu_backward}


def activation(x, act):
    return ref.ACTIVATIONS[act](x)                                   # [...]


def activation_backward(dy, x, act):
    return ACTIVATION_BACKWARDS[act](dy, x)                          # [...]

# ---------------------------------------------------------------- building blocks


def linear_backward(dy, x, w):
    """y = x @ w.T + b  ->  dx = dy @ w, dw = dy.T @ x, db = sum dy."""
    dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])  # [rows, out], [rows, in]
    dx = (dy2 @ w).reshape(x.shape)                                  # [..., in]
    dw = dy2.T @ x2 if w.shape[0] >= w.shape[1] else (x2.T @ dy2).T  # [out, in]: OpenBLAS is faster with the
    return dx, {"w": dw, "b": dy2.sum(0)}                            # longer side as the product's rows [out]


def layer_norm_backward(dy, x, g, eps):
    """Gradient of reference.layer_norm from its input x (mean and variance recomputed)."""
    mu = x.mean(-1, keepdims=True)                                   # [..., 1]
    rstd = 1.0 / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + x.dtype.type(eps))  # [..., 1]
    xhat = (x - mu) * rstd                                           # [..., H]
    dxhat = dy * g                                                   # [..., H]
    dx = rstd * (dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True))  # [..., H]
    lead = tuple(range(dy.ndim - 1))
    return dx, {"g": (dy * xhat).sum(lead), "b": dy.sum(lead)}       # [..., H], [H], [H]


def softmax_backward(dy, y, axis=-1):
    """y = softmax(z)  ->  dz = y * (dy - sum(y * dy))."""
    return y * (dy - (y * dy).sum(axis, keepdims=True))              # [...]


def embeddings_forward(ids, tt, word, position, token_type, ln, eps, p=0.0, rng=None):
    L = ids.shape[1]
    x0 = word[ids] + position[:L][None] + token_type[tt]             # [B, L] -> [B, L, H] input embeddings
    y, keep = dropout_forward(ref.layer_norm(x0, **ln, eps=eps), p, rng)  # [B, L, H]
    return y, {"ids": ids, "tt": tt, "x0": x0, "keep": keep}


def embeddings_backward(dy, cache, word, position, token_type, ln, eps):
    """Returns the gradients of the tables and LayerNorm, and d_inputs [B, L, H] (the input embeddings')."""
    ids, tt = cache["ids"], cache["tt"]
    dx0, d_ln = layer_norm_backward(dropout_backward(dy, cache["keep"]), cache["x0"], ln["g"], eps)  # [B, L, H]
    H = dx0.shape[-1]
    d_word = np.zeros(word.shape, word.dtype)                        # [V, H]
    np.add.at(d_word, ids.reshape(-1), dx0.reshape(-1, H))           # the gather scatters back
    d_pos = np.zeros(position.shape, position.dtype)                 # [P, H]
    d_pos[:ids.shape[1]] = dx0.sum(0)                                # [L, H]
    d_tt = np.zeros(token_type.shape, token_type.dtype)             # [T, H]
    np.add.at(d_tt, tt.reshape(-1), dx0.reshape(-1, H))
    return {"word": d_word, "position": d_pos, "token_type": d_tt, "ln": d_ln}, dx0


def attention_forward(x, mask, log_size, q, k, v, o, n_head, p=0.0, rng=None):
    """reference.attention, step by step (so the backward gets Q, K, V and the probabilities), plus
    dropout on the probabilities as BERT trains. Without dropout its output equals reference.attention's."""
    B, n, H = x.shape
    d = H // n_head
    heads = lambda t: t.reshape(B, n, n_head, d).transpose(0, 2, 1, 3)  # [B, n, H] -> [B, h, n, d]
    Q, K, V = heads(ref.linear(x, **q)), heads(ref.linear(x, **k)), heads(ref.linear(x, **v))  # [B, h, n, d]
    logits = Q @ K.transpose(0, 1, 3, 2) / x.dtype.type(np.sqrt(d))  # [B, h, n, n]
    bias = np.where(mask > 0, np.float32(0), ref.NEG)                 # [B, n]
    if log_size is not None:
        bias = bias + log_size                                       # [B, n]
    probs = ref.softmax(logits + bias[:, None, None, :].astype(np.float32))  # [B, h, n, n]
    dropped, keep = dropout_forward(probs, p, rng)                   # [B, h, n, n]
    ctx = (dropped @ V).transpose(0, 2, 1, 3).reshape(B, n, H)       # [B, h, n, d] -> [B, n, H]
    keys = K.transpose(0, 2, 1, 3).reshape(B, n, H)                  # [B, n, H]
    cache = {"x": x, "Q": Q, "K": K, "V": V, "probs": probs, "dropped": dropped, "keep": keep, "ctx": ctx}
    return ref.linear(ctx, **o), probs, keys, cache


def attention_backward(dy, cache, q, k, v, o, n_head, d_probs=None):
    """dy [B, n, H] the output's gradient; d_probs [B, h, n, n] an extra gradient on the probabilities
    (from FCA's scores), or None. Returns dx [B, n, H] and {"q", "k", "v", "o"} gradients."""
    x, Q, K, V, P = cache["x"], cache["Q"], cache["K"], cache["V"], cache["probs"]
    B, n, H = x.shape
    d = H // n_head
    d_ctx, g_o = linear_backward(dy, cache["ctx"], o["w"])           # [B, n, H]
    d_ctx = d_ctx.reshape(B, n, n_head, d).transpose(0, 2, 1, 3)     # [B, h, n, d]
    dV = cache["dropped"].transpose(0, 1, 3, 2) @ d_ctx              # [B, h, n, d]
    dP = dropout_backward(d_ctx @ V.transpose(0, 1, 3, 2), cache["keep"])  # [B, h, n, n]
    if d_probs is not None:
        dP = dP + d_probs                                            # [B, h, n, n]
    d_logits = softmax_backward(dP, P) / x.dtype.type(np.sqrt(d))    # [B, h, n, n] (the 1/sqrt(d) folded in)
    dQ, dK = d_logits @ K, d_logits.transpose(0, 1, 3, 2) @ Q        # [B, h, n, d]
    merge = lambda t: t.transpose(0, 2, 1, 3).reshape(B, n, H)       # [B, h, n, d] -> [B, n, H]
    dx_q, g_q = linear_backward(merge(dQ), x, q["w"])                # [B, n, H]
    dx_k, g_k = linear_backward(merge(dK), x, k["w"])
    dx_v, g_v = linear_backward(merge(dV), x, v["w"])
    return dx_q + dx_k + dx_v, {"q": g_q, "k": g_k, "v": g_v, "o": g_o}


def add_layer_norm_backward(dy, s, g, eps):
    """y = layer_norm(x + residual): both inputs get the same gradient; s = x + residual from the forward."""
    return layer_norm_backward(dy, s, g, eps)                        # [B, n, H], {"g", "b"}


def ffn_forward(x, i, o, act, ops=None):
    pre = ref.linear(x, **i)                                         # [B, n, H] -> [B, n, I]
    mid = (ops or OPS).activation(pre, act)                          # [B, n, I]
    return ref.linear(mid, **o), {"x": x, "pre": pre, "mid": mid}    # [B, n, H]


def ffn_backward(dy, cache, i, o, act, ops=None):
    d_mid, g_o = linear_backward(dy, cache["mid"], o["w"])           # [B, n, I]
    d_pre = (ops or OPS).activation_backward(d_mid, cache["pre"], act)  # [B, n, I]
    dx, g_i = linear_backward(d_pre, cache["x"], i["w"])             # [B, n, H]
    return dx, {"i": g_i, "o": g_o}


# ---------------------------------------------------------------- heads


def pooler_backward(dy, x, pooled, w):
    """pooled = tanh(linear(x[:, 0])): returns dx [B, n, H] (nonzero at unit 0 only) and {"w", "b"}."""
    d_first, g = linear_backward(dy * (1.0 - pooled * pooled), x[:, 0], w)  # [B, H]
    dx = np.zeros_like(x)                                            # [B, n, H]
    dx[:, 0] = d_first
    return dx, g


def classifier_backward(dy, pooled, w):
    return linear_backward(dy, pooled, w)                            # [B, C] -> [B, H], {"w", "b"}


def mean_pool_backward(dy, x, mask, sizes=None):
    """reference.mean_pool is linear in x: each unit gets dy times its share of the weight."""
    w = (mask.astype(np.float32) if sizes is None else sizes * (mask > 0)).astype(x.dtype)  # [B, n]
    share = w / np.maximum(w.sum(1, keepdims=True), 1e-9)            # [B, n] in x's dtype, as the forward divides
    return (dy[:, None, :] * share[:, :, None]).astype(x.dtype)      # [B, H] -> [B, n, H]


# ---------------------------------------------------------------- FCA
# How the scores of each rule depend on the attention (or the hidden states): the backward of
# reference.attention_stats + fca.SCORES. A rule missing here gets no gradient through its scores,
# which is only allowed where the weights do not depend on them (CONSTANT_WEIGHTS) or the rule is random.

SOFTMAX_WEIGHTS = ("weighted", "clusters")        # coarse weights = softmax of the scores (in each group)
CONSTANT_WEIGHTS = ("drop", "mean", "similarity")  # weights from the sizes alone: no gradient to the scores


def received_backward(ds, abar, valid, x):
    """received_j = (sum_i valid_i Abar[i, j] - Abar[j, j]) valid_j."""
    dsv = ds * valid                                                 # [B, n]
    d_abar = valid[:, :, None] * dsv[:, None, :]                     # [B, n, n] every valid query row i
    j = np.arange(abar.shape[1])
    d_abar[:, j, j] -= dsv                                           # minus the diagonal
    return d_abar, None


def cls_backward(ds, abar, valid, x):
    """cls_j = Abar[0, j] valid_j."""
    d_abar = np.zeros_like(abar)                                     # [B, n, n]
    d_abar[:, 0, :] = ds * valid
    return d_abar, None


def entropy_backward(ds, abar, valid, x):
    """entropy_j = -sum_k Abar[j, k] log(max(Abar[j, k], 1e-30)) valid_j."""
    safe = np.maximum(abar, 1e-30)                                   # [B, n, n]
    return -(ds * valid)[:, :, None] * (np.log(safe) + (abar >= 1e-30)), None  # [B, n, n]


def hidden_norm_backward(ds, abar, valid, x):
    """s_j = ||x_j|| -> ds x_j / ||x_j||: the gradient goes to the hidden states, not the attention."""
    norm = np.sqrt((x.astype(np.float64) ** 2).sum(-1, keepdims=True))  # [B, n, 1]
    return None, ds[:, :, None] * x / np.maximum(norm, 1e-30)        # [B, n, H]


SCORE_BACKWARDS = {"attention_received": received_backward, "cls_attention": cls_backward,
                   "attention_entropy": entropy_backward, "hidden_norm": hidden_norm_backward}
NO_GRADIENT_SCORES = ("random",)


def check_trainable(cfg):
    """Raise a ConfigError unless every part of this FCA configuration has a known backward."""
    if cfg.aggregate not in SOFTMAX_WEIGHTS + CONSTANT_WEIGHTS:
        raise ConfigError(f"FCA aggregate {cfg.aggregate!r} has no backward (training supports "
                          f"{', '.join(SOFTMAX_WEIGHTS + CONSTANT_WEIGHTS)})")
    if cfg.aggregate in SOFTMAX_WEIGHTS and cfg.score not in SCORE_BACKWARDS and cfg.score not in NO_GRADIENT_SCORES:
        raise ConfigError(f"FCA score {cfg.score!r} has no backward, and aggregate {cfg.aggregate!r} weights units "
                          f"by it (train with one of {', '.join(SCORE_BACKWARDS)}, or a size-weighted aggregate)")


def fca_forward(cfg, layer, x, mask, sizes, stats, keys, seeds, n_tokens):
    """FCAState.reduce, one sequence at a time through fca.reduce_sequence and fca.merge (the same units,
    order and values), keeping each sequence's selection: x [B, n, H] -> x [B, n', H], mask, sizes [B, n']."""
    B, n, H = x.shape
    rows = []
    for b in range(B):
        valid = np.flatnonzero(mask[b] > 0)                          # [v]
        rng = np.random.default_rng([cfg.seed, layer, int(seeds[b]) & 0xFFFFFFFF])  # as FCAState.reduce
        st = {name: s[b, valid] for name, s in stats.items()}
        fine, rest, groups, w = fca_mod.reduce_sequence(cfg, layer, x[b, valid], sizes[b, valid], st,
                                                        keys[b, valid], rng, int(n_tokens[b]))
        new_x, new_sizes, W = fca_mod.merge(x[b, valid], sizes[b, valid], fine, rest, groups, w)  # [k + c, H]
        rows.append({"valid": valid, "fine": fine, "rest": rest, "groups": groups, "w": w, "W": W,
                     "x": new_x, "sizes": new_sizes})
    N = max(len(r["sizes"]) for r in rows)
    new_x = np.zeros((B, N, H), x.dtype)                             # [B, n', H]
    new_mask = np.zeros((B, N), mask.dtype)                          # [B, n']
    new_sizes = np.zeros((B, N), sizes.dtype)                        # [B, n']
    for b, r in enumerate(rows):
        u = len(r["sizes"])
        new_x[b, :u], new_mask[b, :u], new_sizes[b, :u] = r.pop("x"), 1, r.pop("sizes")
    return new_x, new_mask, new_sizes, {"rows": rows, "x": x, "n": n}


def fca_backward(dy, cache, aggregate):
    """dy [B, n', H] -> dx [B, n, H] (fine: scattered back; coarse: W.T @ d_coarse) and d_scores [B, n]
    (through the softmax weights; zero for size-weighted aggregates)."""
    x = cache["x"]
    B, n, _ = x.shape
    dx = np.zeros_like(x)                                            # [B, n, H]
    ds = np.zeros((B, n))                                            # [B, n] float64 as the scores
    for b, r in enumerate(cache["rows"]):
        valid, fine, rest, groups, w, W = r["valid"], r["fine"], r["rest"], r["groups"], r["w"], r["W"]
        k, c = len(fine), W.shape[0]
        dx[b, valid[fine]] = dy[b, :k]                               # [k, H] each fine unit copies one unit
        if c == 0:
            continue
        d_coarse = dy[b, k:k + c].astype(np.float64)                 # [c, H]
        dx[b, valid[rest]] += (W.T @ d_coarse).astype(x.dtype)       # [m, H] coarse_g = sum_j W[g, j] x_j
        if aggregate in SOFTMAX_WEIGHTS:
            kept = groups >= 0
            dw = np.zeros(len(rest))                                 # [m] dL/dw_j = d_coarse[g_j] . x_j
            dw[kept] = (d_coarse[groups[kept]] * x[b, valid[rest[kept]]]).sum(1)
            total = np.zeros(c)
            np.add.at(total, groups[kept], (w * dw)[kept])
            ds[b, valid[rest[kept]]] = (w * (dw - total[groups]))[kept]  # softmax within each group
    return dx, ds


# ---------------------------------------------------------------- one layer, the whole model
# The training forward is reference.bert_forward itself (the one loop over layers), handed a `Tape`:
# the ops contract (minifca/kernels/__init__.py) with dropout where BERT trains with it, recording
# per layer what `layer_backward` reads.


class Tape:
    """The training ops: reference.bert_forward's ops contract, each op the reference's (or its `*_forward`
    twin above) plus dropout, writing what the backward needs on the tape as the loop runs.

    A layer's ops come in the loop's order: attention (opens the layer's record), add_layer_norm (s1),
    reduce (FCA layers only), ffn, add_layer_norm (s2). p_hidden: dropout on the embeddings' output and
    on the attention's and the FFN's outputs before their residual; p_attn: on the attention probabilities.
    kernels: where `activation` comes from (this module, or minifca.kernels.cpu_grad). grad.forward runs
    it without a trace (`reduce` records the units, not the trace's members)."""

    def __init__(self, p_hidden=0.0, p_attn=0.0, rng=None, kernels=None):
        self.p_hidden, self.p_attn, self.rng, self.kernels = p_hidden, p_attn, rng, kernels
        self.emb, self.layers = None, []                             # embeddings_backward's cache, per layer dicts

    def resident_params(self, params):
        return params                                                # NumPy reads them where they are

    def embeddings(self, ids, tt, word, position, token_type, ln, eps):
        x, self.emb = embeddings_forward(ids, tt, word, position, token_type, ln, eps, self.p_hidden, self.rng)
        return x                                                     # [B, L, H] (dropped out)

    def attention(self, x, mask, log_size, q, k, v, o, n_head, want_probs, want_stats):
        a, probs, keys, c_attn = attention_forward(x, mask, log_size, q, k, v, o, n_head, self.p_attn, self.rng)
        a, keep_a = dropout_forward(a, self.p_hidden, self.rng)      # [B, n, H] before the residual
        self.layers.append({"mask": mask, "attn": c_attn, "keep_a": keep_a, "fca": None})  # a new layer
        stats = ref.attention_stats(probs, mask) if want_stats else None  # {name: [B, n]}
        return a, probs, stats, keys

    def add_layer_norm(self, x, residual, g, b, eps):
        rec = self.layers[-1]
        s = x + residual                                             # [B, n, H] what layer_norm_backward reads
        y = ref.layer_norm(s, g, b, eps)                             # [B, n, H] = ref.add_layer_norm(x, residual)
        rec.update({"s2": s} if "ffn" in rec else {"s1": s, "x1": y})  # after the FFN: s2; after attention: s1
        return y

    def ffn(self, x, i, o, act):
        f, c_ffn = ffn_forward(x, i, o, act, ops=self.kernels)       # [B, n', H]
        f, keep_f = dropout_forward(f, self.p_hidden, self.rng)      # [B, n', H] before the residual
        self.layers[-1].update({"ffn": c_ffn, "keep_f": keep_f})
        return f

    def pack(self, x, mask):
        return x                                                     # the padded batch, as the reference

    def log_size(self, sizes):
        return ref.log_size(sizes)                                   # [B, n] counts: no gradient

    def reduce(self, state, layer, cfg, x, mask, sizes, stats, keys):
        """One FCA layer by fca_forward (per sequence, keeping each selection for fca_backward), recorded
        on `state` as FCAState.reduce records it (units and FLOPs count the same)."""
        x, new_mask, sizes, cache = fca_forward(cfg, layer, x, mask, sizes, stats or {}, keys, state.seeds,
                                                state.n_tokens)      # [B, n', H], [B, n'], [B, n']
        self.layers[-1]["fca"] = cache
        rows = cache["rows"]
        n_in = np.array([len(r["valid"]) for r in rows])             # [B] units entering
        n_merged = np.array([int((r["groups"] >= 0).sum()) for r in rows])  # [B] dropped units cost nothing
        n_fine = [len(r["fine"]) if len(r["rest"]) else f for r, f in zip(rows, state.n_fine)]
        scored = np.array([len(r["rest"]) > 0 for r in rows])       # [B] did the sequence shrink here?
        state.record(layer, new_mask, merged=(n_in, n_merged, n_fine), scored=scored)
        return x, new_mask, sizes

    def reduce_batch(self, s, x, sizes, valid, k, c, active, aggregate):
        """The contract's batched reduction (fca.reduce_batch); `reduce` above goes per sequence instead."""
        return fca_mod.reduce_batch(s, x, sizes, valid, k, c, active, aggregate)  # [B, N, H], [B, N]

    def to_host(self, a):
        return a                                                     # NumPy already


def layer_backward(dy, cache, p, cfg, fca=None, ops=None):
    eps = cfg.layer_norm_eps
    d_s2, g_ffn_ln = add_layer_norm_backward(dy, cache["s2"], p["ffn_ln"]["g"], eps)  # [B, n', H]
    d_x1, g_ffn = ffn_backward(dropout_backward(d_s2, cache["keep_f"]), cache["ffn"], **p["ffn"], act=cfg.hidden_act,
                               ops=ops)
    d_x1 = d_x1 + d_s2                                               # the residual
    d_probs = None
    if cache["fca"] is not None:
        d_x1, ds = fca_backward(d_x1, cache["fca"], fca.aggregate)   # [B, n, H], [B, n]
        back = SCORE_BACKWARDS.get(fca.score)
        if back is not None and fca.aggregate in SOFTMAX_WEIGHTS:
            P, valid = cache["attn"]["probs"], (cache["mask"] > 0).astype(np.float64)
            d_abar, d_hidden = back(ds, P.mean(1), valid, cache["fca"]["x"])  # [B, n, n] / [B, n, H]
            if d_abar is not None:
                d_probs = np.broadcast_to((d_abar / P.shape[1]).astype(P.dtype)[:, None], P.shape)  # Abar = mean_h
            if d_hidden is not None:
                d_x1 = d_x1 + d_hidden.astype(d_x1.dtype)
    d_s1, g_attn_ln = add_layer_norm_backward(d_x1, cache["s1"], p["attn_ln"]["g"], eps)  # [B, n, H]
    d_x, g_attn = attention_backward(dropout_backward(d_s1, cache["keep_a"]), cache["attn"], **p["attn"],
                                     n_head=cfg.num_attention_heads, d_probs=d_probs)
    return d_x + d_s1, {"attn": g_attn, "attn_ln": g_attn_ln, "ffn": g_ffn, "ffn_ln": g_ffn_ln}


def forward(params, cfg, ids, mask, tt, fca=None, dropout=0.0, attn_dropout=None, rng=None, seeds=None, ops=None):
    """The training forward: reference.bert_forward (plus the heads and mean pooling) with a cache.

    dropout: hidden dropout probability (embeddings, attention output, FFN output, before the
    classifier); attn_dropout: on the attention probabilities (default: dropout). No rng, no dropout.
    seeds: [B] seeds of FCA's random rule (fca.sequence_seeds(ids, mask) when None). ops: where `activation`
    and `activation_backward` come from (this module, or the Numba kernels of minifca.kernels.cpu_grad).
    Returns ({last_hidden_state, mask, sizes, embeddings, pooler_output, logits}, cache).
    """
    p_hidden = dropout if rng is not None else 0.0
    p_attn = (dropout if attn_dropout is None else attn_dropout) if rng is not None else 0.0
    if fca is not None:
        check_trainable(fca)
        fca.check_layers(cfg.num_hidden_layers)
    mask = (np.asarray(mask) > 0).astype(np.float32)                 # [B, L]
    if fca is not None and seeds is None:
        seeds = fca_mod.sequence_seeds(ids, mask)                    # [B]
    tape = Tape(p_hidden, p_attn, rng, ops)
    run = ref.bert_forward(params, cfg, ids, mask, tt, fca=fca, ops=tape, seeds=seeds)  # the one layer loop
    x, mask, sizes = run["last_hidden_state"], run["mask"], run["sizes"]  # [B, n, H], [B, n], [B, n]
    out = {"last_hidden_state": x, "mask": mask, "sizes": sizes, "embeddings": ref.mean_pool(x, mask, sizes),
           "pooler_output": None, "logits": None}
    cache = {"emb": tape.emb, "layers": tape.layers, "fca": fca, "x": x, "mask": mask, "sizes": sizes, "ops": ops}
    if "pooler" in params:
        out["pooler_output"] = ref.pooler(x, **params["pooler"])     # [B, H]
        if "classifier" in params:
            dropped, cache["keep_cls"] = dropout_forward(out["pooler_output"], p_hidden, rng)
            out["logits"] = ref.classifier(dropped, **params["classifier"])  # [B, C]
            cache["cls_in"] = dropped
    cache["pooled"] = out["pooler_output"]
    return out, cache


def backward(params, cfg, cache, d_out):
    """d_out: gradients of the loss w.r.t. forward's outputs ({"logits", "pooler_output", "embeddings",
    "last_hidden_state"}, any subset). Returns (grads in params' nested layout, d_inputs [B, L, H])."""
    x, mask, sizes = cache["x"], cache["mask"], cache["sizes"]
    grads = {}
    dx = np.zeros_like(x)                                            # [B, n, H]
    if d_out.get("last_hidden_state") is not None:
        dx = dx + d_out["last_hidden_state"]
    if d_out.get("embeddings") is not None:
        dx = dx + mean_pool_backward(d_out["embeddings"], x, mask, sizes)
    d_pooled = d_out.get("pooler_output")
    if d_out.get("logits") is not None:
        d_in, grads["classifier"] = classifier_backward(d_out["logits"], cache["cls_in"], params["classifier"]["w"])
        d_in = dropout_backward(d_in, cache.get("keep_cls"))        # [B, H]
        d_pooled = d_in if d_pooled is None else d_pooled + d_in
    if "pooler" in params:
        if d_pooled is None:
            d_pooled = np.zeros_like(cache["pooled"])
        d_first, grads["pooler"] = pooler_backward(d_pooled, x, cache["pooled"], params["pooler"]["w"])
        dx = dx + d_first
    if "classifier" in params and "classifier" not in grads:
        grads["classifier"] = {name: np.zeros_like(v) for name, v in params["classifier"].items()}
    grads["layers"] = [None] * len(params["layers"])
    for layer in reversed(range(len(params["layers"]))):
        dx, grads["layers"][layer] = layer_backward(dx, cache["layers"][layer], params["layers"][layer], cfg,
                                                    cache["fca"], cache["ops"])
    grads["embeddings"], d_inputs = embeddings_backward(dx, cache["emb"], **params["embeddings"],
                                                        eps=cfg.layer_norm_eps)
    return grads, d_inputs


OPS = sys.modules[__name__]                                          # the default ops: this module


# ---------------------------------------------------------------- losses: (value, gradient)


def log_softmax(z):
    z = z.astype(np.float64) - z.max(-1, keepdims=True)              # [B, C]
    return z - np.log(np.exp(z).sum(-1, keepdims=True))              # [B, C]


def cross_entropy(logits, labels):
    """Mean cross-entropy over the batch and its gradient w.r.t. the logits."""
    B = len(labels)
    logp = log_softmax(logits)                                       # [B, C]
    d = np.exp(logp)
    d[np.arange(B), labels] -= 1.0
    return float(-logp[np.arange(B), labels].mean()), (d / B).astype(logits.dtype)


def kl_to_teacher(logits, teacher_logits, temperature=1.0):
    """T^2 * mean KL(softmax(teacher / T) || softmax(student / T)) (Hinton et al.) and its gradient."""
    T = float(temperature)
    lp, lq = log_softmax(logits / T), log_softmax(teacher_logits / T)  # [B, C]
    q = np.exp(lq)
    loss = T * T * float((q * (lq - lp)).sum(-1).mean())
    return loss, (T * (np.exp(lp) - q) / len(logits)).astype(logits.dtype)


def cosine_to_teacher(emb, teacher_emb):
    """Mean (1 - cos(student, teacher)) over the batch and its gradient w.r.t. the student's embeddings."""
    e, t = emb.astype(np.float64), teacher_emb.astype(np.float64)    # [B, H]
    ne = np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    nt = np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
    cos = (e * t).sum(1, keepdims=True) / (ne * nt)                  # [B, 1]
    d = -(t / (ne * nt) - cos * e / (ne * ne)) / len(e)              # [B, H]
    return float((1.0 - cos).mean()), d.astype(emb.dtype)


def mse_to_teacher(emb, teacher_emb):
    """Mean over the batch of the squared distance ||student - teacher||^2 / H, and its gradient."""
    diff = emb.astype(np.float64) - teacher_emb                      # [B, H]
    return float((diff ** 2).mean()), (2.0 * diff / diff.size).astype(emb.dtype)


# ---------------------------------------------------------------- parameters as a flat list


def leaves(tree, prefix=""):
    """[(path, array)] of a nested params/grads dict in a fixed order ('layers.0.attn.q.w', ...)."""
    if isinstance(tree, dict):
        return [kv for key in tree for kv in leaves(tree[key], f"{prefix}{key}.")]
    if isinstance(tree, list):
        return [kv for i, t in enumerate(tree) for kv in leaves(t, f"{prefix}{i}.")]
    return [(prefix[:-1], tree)]


def trainable(params):
    """The parameters training updates, as writable C-ordered copies in the same nested layout (no masked-LM
    head). C order: the optimizer updates each tensor through a flat view, which only a C-ordered array gives."""
    copy = lambda t: ({k: copy(v) for k, v in t.items()} if isinstance(t, dict)
                      else [copy(v) for v in t] if isinstance(t, list) else np.array(t, copy=True, order="C"))
    return copy({k: v for k, v in params.items() if k != "mlm"})
