"""The attention core (kernels.cpu._attend) against a BLAS variant: batched np.matmul for q.k^T and p.V with a
Numba softmax (+ FCA head mean) in between, one chunk of sequences at a time. Wall-clock, best of 15.
Usage: python benchmarks/attention_blas_variant.py   (NUMBA_NUM_THREADS / OPENBLAS_NUM_THREADS to pin threads)
"""
import math

import numba as nb
import numpy as np

from minifca.kernels import cpu
from minifca.bench import best_ms

F32 = np.float32


@nb.njit(parallel=True, cache=True, nogil=True)
def softmax_rows(s, bias, scale, want_stats, abar):
    """s [b, h, n, n] logits -> probabilities in place; abar [b, n, n] head mean if want_stats."""
    b, h, n, _ = s.shape
    for t in nb.prange(b * n):
        b_, i = t // n, t % n
        for k in range(h):
            cpu._softmax_row(s[b_, k, i], bias[b_], scale)
        if want_stats:
            for j in range(n):
                a = F32(0.0)
                for k in range(h):
                    a += s[b_, k, i, j]
                abar[b_, i, j] = a / F32(h)


def attend_blas(Q, K, V, bias, n_head, want_stats, abar, ctx, budget=8 << 20):
    """Same outputs as cpu._attend without probabilities; [b, h, n, n] logits in chunks of <= budget bytes."""
    B, n, H = Q.shape
    d = H // n_head
    heads = lambda t: t.reshape(t.shape[0], n, n_head, d).transpose(0, 2, 1, 3)  # noqa: E731
    step = max(1, budget // (n_head * n * n * 4))
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        s = np.matmul(heads(Q[b0:b1]), heads(K[b0:b1]).transpose(0, 1, 3, 2))    # [b, h, n, n]
        softmax_rows(s, bias[b0:b1], F32(math.sqrt(d)), want_stats, abar[b0:b1])
        np.matmul(s, heads(V[b0:b1]), out=heads(ctx[b0:b1]))


rng = np.random.default_rng(0)
for B, n, H, h in [(1, 128, 384, 12), (8, 128, 384, 12), (32, 64, 384, 12), (1, 128, 768, 12),
                   (8, 128, 768, 12), (32, 64, 768, 12), (1, 32, 384, 12), (2, 512, 384, 12)]:
    Q, K, V = (rng.normal(size=(B, n, H)).astype(F32) for _ in range(3))
    bias = np.where(rng.random((B, n)) < 0.9, F32(0), F32(-1e30)).astype(F32)
    bias[:, 0] = 0
    ctx1, ctx2 = np.empty((B, n, H), F32), np.empty((B, n, H), F32)
    abar1, abar2 = np.empty((B, n, n), F32), np.empty((B, n, n), F32)
    no_probs = np.empty((1, 1, 1, 1), F32)
    t1 = best_ms(lambda: cpu._attend(Q, K, V, bias, h, False, True, no_probs, abar1, ctx1), 15)
    t2 = best_ms(lambda: attend_blas(Q, K, V, bias, h, True, abar2, ctx2), 15)
    print(f"{B}x{n} H={H}: loop {t1:.2f} ms, blas {t2:.2f} ms ({t1 / t2:.2f}x)  diff ctx "
          f"{np.abs(ctx1 - ctx2).max():.1e} abar {np.abs(abar1 - abar2).max():.1e}", flush=True)
