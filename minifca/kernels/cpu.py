"""The Numba CPU backend: `reference.py`'s compute functions, same names, same signatures, compiled.

Each public function here mirrors the reference function of the same name and is tested
against it (tests/test_kernels.py). What changes is how the work is done, not what it is:

- matrix products with the weights go through BLAS (NumPy's matmul); Numba would need scipy
  to reach BLAS itself, and a hand-written loop is slower than OpenBLAS at these shapes;
- everything between two matrix products is one parallel Numba loop over rows: bias +
  activation, residual + LayerNorm, embedding gather + LayerNorm;
- attention is one parallel loop over (sequence, query row): for each head, logits, masked
  softmax and the weighted sum of values, while the head-averaged row that FCA's scores need
  is accumulated on the fly. [B, h, n, n] exists only when the caller asks for probabilities.

No fastmath: every row is computed by one thread in a fixed order, so the same input gives
bit-identical output run to run, whatever the scheduling.

Threads: Numba's OpenMP pool and OpenBLAS's pool take turns on the same cores. OpenMP threads
that spin after a parallel loop starve the next BLAS call (measured: a 1024x768x3072 GEMM
followed by a LayerNorm took 160 ms instead of 98 ms on 2 cores), so unless the user chose
otherwise, idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE, read when Numba first starts
its pool).
"""
from __future__ import annotations

import math
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba as nb
import numpy as np

from .. import reference
from ..errors import ConfigError

F32 = np.float32
ACT_CODES = {"gelu": 0, "gelu_new": 1, "gelu_pytorch_tanh": 1, "gelu_fast": 1, "relu": 2, "silu": 3, "swish": 3}
_jit = dict(cache=True, nogil=True)

# ---------------------------------------------------------------- row helpers (inlined into the loops below)


@nb.njit(inline="always", **_jit)
def _ln_row(row, g, b, eps, out):
    """out = (row - mean) / sqrt(var + eps) * g + b, statistics accumulated in float64."""
    H = row.shape[0]
    s = 0.0
    for c in range(H):
        s += row[c]
    mu = s / H
    v = 0.0
    for c in range(H):
        t = row[c] - mu
        v += t * t
    mu32 = np.float32(mu)
    inv = np.float32(1.0) / np.float32(math.sqrt(np.float32(v / H) + eps))
    for c in range(H):
        out[c] = (row[c] - mu32) * inv * g[c] + b[c]


@nb.njit(inline="always", **_jit)
def _act(x, code):
    if code == 0:                                                    # exact GELU, x * Phi(x)
        return np.float32(0.5) * x * (np.float32(1.0) + np.float32(math.erf(x * np.float32(0.7071067811865476))))
    if code == 1:                                                    # tanh approximation
        return np.float32(0.5) * x * (np.float32(1.0) + np.float32(math.tanh(
            np.float32(0.7978845608028654) * (x + np.float32(0.044715) * x * x * x))))
    if code == 2:
        return max(x, np.float32(0.0))
    return x / (np.float32(1.0) + np.float32(math.exp(-x)))


# ---------------------------------------------------------------- row kernels


@nb.njit(parallel=True, **_jit)
def _layer_norm_rows(x, g, b, eps, out):                              # [R, H] -> [R, H]
    for r in nb.prange(x.shape[0]):
        _ln_row(x[r], g, b, eps, out[r])


@nb.njit(parallel=True, **_jit)
def _add_layer_norm_rows(x, residual, g, b, eps, out):              # [R, H] + [R, H] -> [R, H]
    H = x.shape[1]
    for r in nb.prange(x.shape[0]):
        tmp = np.empty(H, np.float32)
        for c in range(H):
            tmp[c] = x[r, c] + residual[r, c]
        _ln_row(tmp, g, b, eps, out[r])


@nb.njit(parallel=True, **_jit)
def _embed_rows(ids, tt, word, position, token_type, g, b, eps, out):  # [B, L] -> [B, L, H]
    B, L = ids.shape
    H = word.shape[1]
    for r in nb.prange(B * L):
        i, t = r // L, r % L
        w, p, y = word[ids[i, t]], position[t], token_type[tt[i, t]]
        tmp = np.empty(H, np.float32)
        for c in range(H):
            tmp[c] = w[c] + p[c] + y[c]
        _ln_row(tmp, g, b, eps, out[i, t])


@nb.njit(parallel=True, **_jit)
def _bias_act_rows(x, b, code):                                      # [R, I] in place
    for r in nb.prange(x.shape[0]):
        row = x[r]
        for c in range(row.shape[0]):
            row[c] = _act(row[c] + b[c], code)


# ---------------------------------------------------------------- attention


@nb.njit(parallel=True, **_jit)
def _attend(Q, K, V, bias, n_head, want_probs, want_stats, probs, abar, ctx):
    """Masked multi-head attention of every query row; Q, K, V [B, n, H] (biases added), bias [B, n].

    Writes ctx [B, n, H]; probs [B, h, n, n] if want_probs; abar [B, n, n] (head mean) if want_stats.
    """
    B, n, H = Q.shape
    d = H // n_head
    scale = np.float32(math.sqrt(d))
    Kt = np.empty((B, n_head, d, n), np.float32)                     # keys per head, transposed: rows of j
    for bh in nb.prange(B * n_head):
        b_, h = bh // n_head, bh % n_head
        for j in range(n):
            for c in range(d):
                Kt[b_, h, c, j] = K[b_, j, h * d + c]
    for r in nb.prange(B * n):
        b_, i = r // n, r % n
        s = np.empty(n, np.float32)                                  # one head's logits, then probabilities
        acc = np.zeros(n, np.float32)                                # head sum of the probabilities
        out = np.zeros(d, np.float32)
        for h in range(n_head):
            s[:] = 0.0
            for c in range(d):                                       # s = q_i K_h^T
                qc = Q[b_, i, h * d + c]
                kt = Kt[b_, h, c]
                for j in range(n):
                    s[j] += qc * kt[j]
            mx = np.float32(-np.inf)
            for j in range(n):
                s[j] = s[j] / scale + bias[b_, j]
                mx = max(mx, s[j])
            tot = np.float32(0.0)
            for j in range(n):
                s[j] = np.float32(math.exp(s[j] - mx))
                tot += s[j]
            for j in range(n):
                s[j] = s[j] / tot
            if want_probs:
                probs[b_, h, i] = s
            if want_stats:
                for j in range(n):
                    acc[j] += s[j]
            out[:] = 0.0
            for j in range(n):                                       # out = p V_h
                pj = s[j]
                vj = V[b_, j, h * d:(h + 1) * d]
                for c in range(d):
                    out[c] += pj * vj[c]
            ctx[b_, i, h * d:(h + 1) * d] = out
        if want_stats:
            for j in range(n):
                abar[b_, i, j] = acc[j] / np.float32(n_head)


@nb.njit(parallel=True, **_jit)
def _head_mean(probs, out):                                          # [B, h, n, n] -> [B, n, n]
    B, h, n, _ = probs.shape
    for r in nb.prange(B * n):
        b_, i = r // n, r % n
        for j in range(n):
            t = np.float32(0.0)
            for k in range(h):
                t += probs[b_, k, i, j]
            out[b_, i, j] = t / np.float32(h)


@nb.njit(parallel=True, **_jit)
def _stats_from_abar(abar, valid, received, cls, entropy):
    """FCA statistics of the head-averaged attention abar [B, n, n]; see reference.attention_stats."""
    B, n, _ = abar.shape
    for b_ in nb.prange(B):
        rec = np.zeros(n, np.float64)
        for i in range(n):
            if valid[b_, i] > 0:
                for j in range(n):
                    rec[j] += abar[b_, i, j]
        for j in range(n):
            e = 0.0
            for k in range(n):
                a = abar[b_, j, k]
                e -= a * math.log(max(a, np.float32(1e-30)))
            v = valid[b_, j]
            received[b_, j] = np.float32(rec[j] - abar[b_, j, j]) * v
            cls[b_, j] = abar[b_, 0, j] * v
            entropy[b_, j] = np.float32(e) * v


# ---------------------------------------------------------------- the functions of reference.py


def _linear(x2, w, b):
    """[R, in] @ [out, in]^T + b through BLAS (no copy of the memory-mapped weight)."""
    y = np.matmul(x2, w.T)                                           # [R, out]
    y += b
    return y


def _rows(x):
    return np.ascontiguousarray(x, dtype=F32).reshape(-1, x.shape[-1])


def layer_norm(x, g, b, eps):
    out = np.empty(x.shape, F32)
    _layer_norm_rows(_rows(x), g, b, F32(eps), out.reshape(-1, x.shape[-1]))
    return out                                                       # [..., H]


def add_layer_norm(x, residual, g, b, eps):
    out = np.empty(x.shape, F32)
    _add_layer_norm_rows(_rows(x), _rows(residual), g, b, F32(eps), out.reshape(-1, x.shape[-1]))
    return out                                                       # [B, n, H]


def embeddings(ids, tt, word, position, token_type, ln, eps):
    ids, tt = np.ascontiguousarray(ids, np.int64), np.ascontiguousarray(tt, np.int64)
    out = np.empty(ids.shape + (word.shape[1],), F32)                # [B, L, H]
    _embed_rows(ids, tt, word, position, token_type, ln["g"], ln["b"], F32(eps), out)
    return out


def ffn(x, i, o, act):
    if act not in ACT_CODES:
        raise ConfigError(f"config.json hidden_act {act!r} is not supported; choose from {', '.join(ACT_CODES)}")
    x2 = _rows(x)                                                    # [R, H]
    hid = np.matmul(x2, i["w"].T)                                    # [R, I]
    _bias_act_rows(hid, i["b"], ACT_CODES[act])                      # [R, I] in place
    return _linear(hid, **o).reshape(x.shape)                        # [B, n, H]


def attention_stats(probs, mask):
    """reference.attention_stats from full probabilities [B, h, n, n]."""
    B, _, n, _ = probs.shape
    abar = np.empty((B, n, n), F32)
    _head_mean(np.ascontiguousarray(probs, F32), abar)               # [B, n, n]
    return _stats(abar, mask)


def _stats(abar, mask):
    B, n, _ = abar.shape
    valid = (np.asarray(mask) > 0).astype(F32)                       # [B, n]
    received, cls, entropy = (np.empty((B, n), F32) for _ in range(3))
    _stats_from_abar(abar, valid, received, cls, entropy)
    return {"received": received, "cls": cls, "entropy": entropy}


def attention(x, mask, log_size, q, k, v, o, n_head, want_probs=True, want_stats=False):
    """reference.attention; probabilities only when want_probs, FCA statistics only when want_stats."""
    B, n, H = x.shape
    x2 = _rows(x)                                                    # [B n, H]
    Q, K, V = (_linear(x2, **p).reshape(B, n, H) for p in (q, k, v))  # [B, n, H]
    bias = np.where(np.asarray(mask) > 0, F32(0), reference.NEG)     # [B, n]
    if log_size is not None:
        bias = bias + log_size
    bias = np.ascontiguousarray(bias, F32)
    probs = np.empty((B, n_head, n, n) if want_probs else (1, 1, 1, 1), F32)
    abar = np.empty((B, n, n) if want_stats else (1, 1, 1), F32)
    ctx = np.empty((B, n, H), F32)
    _attend(Q, K, V, bias, n_head, bool(want_probs), bool(want_stats), probs, abar, ctx)
    stats = _stats(abar, mask) if want_stats else None               # {name: [B, n]}
    out = _linear(ctx.reshape(B * n, H), **o).reshape(B, n, H)       # [B, n, H]
    return out, probs if want_probs else None, stats, K


def bert_forward(params, cfg, ids, mask, tt, fca=None, ops=None, **kw):
    """reference.bert_forward (the one orchestration, FCA included) running this module's kernels."""
    return reference.bert_forward(params, cfg, ids, mask, tt, fca=fca, ops=ops or sys.modules[__name__], **kw)
