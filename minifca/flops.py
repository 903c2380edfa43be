"""Analytic FLOPs (2 x multiply-adds), counted over valid units only (docs/fca.md).

Per encoder layer, with n units entering it, k fine + c coarse units leaving selection,
m units merged into the c coarse ones, h heads:
    projections   Q, K, V, O            4 * 2 n H H
    attention     Q K^T and A V         2 * 2 n n H
    LayerNorms    scale and shift       2 n H  (after attention)  +  2 n' H  (after the FFN)
    scoring       head mean + col sums  n n (h + 1)            (only on layers that reduce)
    aggregation   weighted sums         2 m H                  (only on layers that reduce; m = 0 for drop)
    FFN           two linears           2 * 2 n' H I           with n' = k + c units
plus embeddings (sum of three + LayerNorm: 4 L H), pooler (2 H H) and classifier (2 H C).
"""
from __future__ import annotations

import numpy as np


def layer_flops(n_in, n_out, H, I, heads, n_merged=0, scored=False):
    n_in, n_out, n_merged = (np.asarray(v, np.int64) for v in (n_in, n_out, n_merged))
    f = 8 * n_in * H * H + 4 * n_in * n_in * H + 2 * n_in * H + 4 * n_out * H * I + 2 * n_out * H
    return f + np.where(scored, n_in * n_in * (heads + 1) + 2 * n_merged * H, 0)


def flops_per_layer(cfg, n_tokens, units=None):
    """FLOPs of each encoder layer per sequence [num_layers, B]; units as in `model_flops`."""
    H, I, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    n_tokens = np.asarray(n_tokens, np.int64)
    if units is None:
        n = np.broadcast_to(n_tokens, (cfg.num_hidden_layers,) + n_tokens.shape)  # [num_layers, B]
        return layer_flops(n, n, H, I, h)
    n_in, n_out, n_merged, scored = (np.stack([u[key] for u in units]) for key in ("n_in", "n_out", "n_merged", "scored"))
    return layer_flops(n_in, n_out, H, I, h, n_merged, scored)       # [num_layers, B]


def model_flops(cfg, n_tokens, units=None, head=0):
    """FLOPs per sequence [B]. units: FCAState.units (per layer n_in/n_out/n_merged/scored) or None = full."""
    n_tokens = np.asarray(n_tokens, np.int64)
    return 4 * n_tokens * cfg.hidden_size + flops_per_layer(cfg, n_tokens, units).sum(0) + head


def head_flops(cfg, pooler=True, classifier=True):
    """Pooler (2 H H) and classifier (2 H C) work per sequence, for the heads the checkpoint has."""
    H = cfg.hidden_size
    return 2 * H * H * bool(pooler) + 2 * H * cfg.num_labels * bool(classifier)
