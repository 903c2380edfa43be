"""BERT inference in plain NumPy: the specification every fast path is tested against.

Read top to bottom like the paper's equations. Shapes: B batch, L tokens, n units (tokens, or
after FCA layers fine + coarse units), H hidden, h heads, d = H / h, I intermediate, V vocab.
Parameters are the nested dict built by `weights.to_params`, unpacked with `**`.
Linear weights keep the checkpoint's [out, in] layout, so a layer is `x @ w.T + b`.

The forward pass itself (`bert_forward`) is written once, the only loop over layers in the package,
and takes `ops`: this module for the reference, `minifca.kernels.cpu` (Numba) or a
`minifca.kernels.cuda.CudaOps` (GPU). The functions it calls on `ops` are the ops contract, written
out in `minifca/kernels/__init__.py`; every backend provides exactly those.
"""
from __future__ import annotations

import sys

import numpy as np

from . import fca as fca_mod

NEG = np.float32(np.finfo(np.float32).min)  # additive mask for padding keys, as transformers uses

# ---------------------------------------------------------------- activations


def erf(x):
    """erf in float32 without scipy: Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7)."""
    s = np.sign(x)                                                   # [...]
    a = np.abs(x)                                                    # [...]
    t = 1.0 / (1.0 + 0.3275911 * a)                                  # [...]
    y = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return (s * (1.0 - y * np.exp(-a * a))).astype(x.dtype)          # [...]


def gelu(x):
    """The exact GELU, x * Phi(x) (transformers' "gelu")."""
    return 0.5 * x * (1.0 + erf(x * np.float32(0.7071067811865476)))


def gelu_new(x):
    """The tanh approximation ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")."""
    return 0.5 * x * (1.0 + np.tanh(np.float32(0.7978845608028654) * (x + np.float32(0.044715) * x ** 3)))


def relu(x):
    return np.maximum(x, np.float32(0))


def silu(x):
    return x / (1.0 + np.exp(-x))


ACTIVATIONS = {"gelu": gelu, "gelu_new": gelu_new, "gelu_pytorch_tanh": gelu_new, "gelu_fast": gelu_new,
               "relu": relu, "silu": silu, "swish": silu}

# ---------------------------------------------------------------- building blocks


def linear(x, w, b):
    y = x.reshape(-1, x.shape[-1]) @ w.T                             # [..., in] -> [rows, out]: one BLAS product
    return y.reshape(*x.shape[:-1], w.shape[0]) + b                  # [..., out] (x @ w.T on [B, n, in] would
                                                                     # run B small products, slower: BENCHMARKS.md)


def layer_norm(x, g, b, eps):
    mu = x.mean(-1, keepdims=True)                                   # [..., 1]
    var = ((x - mu) ** 2).mean(-1, keepdims=True)                    # [..., 1]
    return (x - mu) / np.sqrt(var + np.float32(eps)) * g + b          # [..., H]


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))                       # [...]
    return e / e.sum(axis, keepdims=True)                            # [...]


def embeddings(ids, tt, word, position, token_type, ln, eps):
    L = ids.shape[1]
    x = word[ids] + position[:L][None] + token_type[tt]              # [B, L] -> [B, L, H]
    return layer_norm(x, **ln, eps=eps)                              # [B, L, H]


def attention(x, mask, log_size, q, k, v, o, n_head, want_probs=True, want_stats=False):
    """Multi-head self-attention over the valid units of each row.

    mask [B, n] (1 = valid unit); log_size [B, n] or None (proportional attention adds
    log(size_j) to every logit of key j). Returns the output projection [B, n, H], the
    probabilities [B, h, n, n] (the reference always returns them), the FCA statistics
    (`attention_stats`, when want_stats) and the keys [B, n, H] (for similarity merging).
    """
    B, n, H = x.shape
    d = H // n_head
    heads = lambda t: t.reshape(B, n, n_head, d).transpose(0, 2, 1, 3)  # [B, n, H] -> [B, h, n, d]
    Q, K, V = heads(linear(x, **q)), heads(linear(x, **k)), heads(linear(x, **v))  # [B, h, n, d]
    logits = Q @ K.transpose(0, 1, 3, 2) / x.dtype.type(np.sqrt(d))  # [B, h, n, n]
    bias = np.where(mask > 0, np.float32(0), NEG)                     # [B, n]
    if log_size is not None:
        bias = bias + log_size                                       # [B, n]
    probs = softmax(logits + bias[:, None, None, :].astype(np.float32))  # [B, h, n, n]
    ctx = (probs @ V).transpose(0, 2, 1, 3).reshape(B, n, H)         # [B, h, n, d] -> [B, n, H]
    keys = K.transpose(0, 2, 1, 3).reshape(B, n, H)                  # [B, n, H]
    stats = attention_stats(probs, mask) if want_stats else None     # {name: [B, n]}
    return linear(ctx, **o), probs, stats, keys


def attention_stats(probs, mask):
    """What the FCA scoring rules read from one layer's attention, per unit j (padding excluded).

    received[b, j] = sum_i Abar[i, j] - Abar[j, j] over valid query rows i (the paper's score);
    cls[b, j] = Abar[0, j]; entropy[b, j] = entropy of unit j's own (head-averaged) attention row.
    """
    valid = (mask > 0).astype(np.float32)                            # [B, n]
    abar = probs.mean(1)                                             # [B, h, n, n] -> [B, n, n]
    diag = np.einsum("bjj->bj", abar)                                # [B, n]
    received = (abar * valid[:, :, None]).sum(1) - diag              # [B, n]
    cls = abar[:, 0, :]                                              # [B, n]
    entropy = -(abar * np.log(np.maximum(abar, 1e-30))).sum(2)       # [B, n]
    return {"received": received * valid, "cls": cls * valid, "entropy": entropy * valid}


def add_layer_norm(x, residual, g, b, eps):
    return layer_norm(x + residual, g, b, eps)                       # [B, n, H]


def ffn(x, i, o, act):
    return linear(ACTIVATIONS[act](linear(x, **i)), **o)             # [B, n, H] -> [B, n, I] -> [B, n, H]


# ---------------------------------------------------------------- heads


def pooler(x, w, b, linear=linear):                                 # linear: a backend's, where it has one
    return np.tanh(linear(x[:, 0], w, b))                            # [B, n, H] -> [B, H]


def classifier(pooled, w, b, linear=linear):
    return linear(pooled, w, b)                                      # [B, H] -> [B, C]


def mlm_head(x, transform, ln, decoder, act, eps):
    y = layer_norm(ACTIVATIONS[act](linear(x, **transform)), **ln, eps=eps)  # [B, n, H]
    return linear(y, **decoder)                                      # [B, n, V]


# ---------------------------------------------------------------- FCA and where the arrays live (ops contract)


def reduce(state, layer, cfg, x, mask, sizes, stats, keys):
    """One FCA layer for the batch (`fca.FCAState.reduce`), its batched layers by `reduce_batch`."""
    return state.reduce(layer, cfg, x, mask, sizes, stats, keys, reduce_batch)  # [B, n', H], [B, n'], [B, n']


reduce_batch = fca_mod.reduce_batch                                  # the NumPy one is the reference


def log_size(sizes):
    """Proportional attention's bias: log(size) of every unit, added to the logits of that key."""
    return np.log(np.maximum(sizes, 1e-30))                          # [B, n]


def pack(x, mask):
    """The layout the layers run in: here the padded batch as it is (padding computed, and never read)."""
    return x                                                         # [B, L, H]


def resident_params(params):
    """The parameters as this backend keeps them: NumPy reads them where they are."""
    return params


def to_host(a):
    """An activation as a NumPy array: here it is one already."""
    return a


def mean_pool(x, mask, sizes=None):
    """Mean of the valid units (sentence-transformers' pooling); each unit weighs its size."""
    w = mask.astype(np.float32) if sizes is None else sizes * (mask > 0)  # [B, n]
    return (x * w[:, :, None]).sum(1) / np.maximum(w.sum(1, keepdims=True), 1e-9)  # [B, H]


# ---------------------------------------------------------------- the forward pass


def bert_forward(params, cfg, ids, mask, tt, fca=None, ops=None, seeds=None,
                 output_hidden_states=False, output_attentions=False, trace=False):
    """Embeddings -> layers (each optionally shortened by FCA) -> final units and heads.

    ids, mask, tt: [B, L] integer arrays. fca: an FCAConfig or None. seeds: [B] per-sequence
    integers that seed FCA's `random` rule (so a sequence gives the same alone or batched).
    Returns a dict: last_hidden_state, mask, sizes, hidden_states, attentions, units (per-layer
    counts for FLOPs), trace.
    """
    ops = ops or sys.modules[__name__]                               # this module: the NumPy ops
    eps, n_head, act = cfg.layer_norm_eps, cfg.num_attention_heads, cfg.hidden_act
    params = ops.resident_params(params)                             # the GPU's copy, uploaded once
    mask = (np.asarray(mask) > 0).astype(np.float32)                 # [B, L] (the mask stays on the host)
    x = ops.pack(ops.embeddings(ids, tt, **params["embeddings"], eps=eps), mask)  # [B, L, H] (numba: valid rows)
    sizes = mask.copy()                                              # [B, n] input tokens per unit
    state = fca_mod.FCAState.start(mask, seeds, trace) if fca is not None else None
    scores_read_stats = fca is not None and fca_mod.score_facts(fca.score).stats
    hidden, attns = [ops.to_host(x)] if output_hidden_states else None, [] if output_attentions else None
    for layer, p in enumerate(params["layers"]):
        reduce = fca is not None and fca.active(layer) and not state.leaves_alone(layer, fca, mask)
        log_size = ops.log_size(sizes) if fca is not None and fca.proportional_attention else None  # [B, n]
        a, probs, stats, K = ops.attention(x, mask, log_size, **p["attn"], n_head=n_head,
                                           want_probs=attns is not None, want_stats=reduce and scores_read_stats)
        x = ops.add_layer_norm(a, x, **p["attn_ln"], eps=eps)     # [B, n, H]
        if attns is not None:
            attns.append(ops.to_host(probs))
        if reduce:
            x, mask, sizes = ops.reduce(state, layer, fca, x, mask, sizes, stats, K)  # [B, n', H]
        elif state is not None:
            state.record(layer, mask)
        x = ops.add_layer_norm(ops.ffn(x, **p["ffn"], act=act), x, **p["ffn_ln"], eps=eps)
        if hidden is not None:
            hidden.append(ops.to_host(x))
    return {"last_hidden_state": ops.to_host(x), "mask": mask, "sizes": ops.to_host(sizes), "hidden_states": hidden,
            "attentions": attns, "units": None if state is None else state.units,
            "trace": None if state is None else state.trace}
