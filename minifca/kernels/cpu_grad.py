"""Numba kernels for the non-GEMM parts of a training step, each named after the minifca.grad / optim
function it replaces and tested against it (tests/test_backward.py).

What a profile of one step showed (benchmarks/ab_train_step.py --profile, MiniLM, batch 32): the matrix
products take ~3/4 of it and stay in BLAS; next come GELU forward + backward (NumPy's erf polynomial
and exp over [rows, I] in several passes: ~15%) and AdamW over all 22.7M parameters (~5%). Here each is one
parallel loop: GELU with kernels.cpu's vectorisable _erf/_exp/_tanh, AdamW fused (decay, both moments
and the update in one pass, in torch's order of operations).

    grad.forward(..., ops=cpu_grad)    grad.backward(..., ops=cpu_grad)    AdamW(..., fused=True)
"""
from __future__ import annotations

import numba as nb
import numpy as np

from .cpu import ACT_CODES, _act_rows, _erf, _exp, _jit, _tanh


@nb.njit(parallel=True, **_jit)
def _act_backward_rows(dy, x, out, code):                            # [R, I] -> [R, I]
    for r in nb.prange(x.shape[0]):
        if code == 0:                                                # Phi(x) + x phi(x)
            for c in range(x.shape[1]):
                v = x[r, c]
                cdf = np.float32(0.5) * (np.float32(1.0) + _erf(v * np.float32(0.7071067811865476)))
                pdf = _exp(np.float32(-0.5) * v * v) * np.float32(0.3989422804014327)
                out[r, c] = dy[r, c] * (cdf + v * pdf)
        elif code == 1:
            for c in range(x.shape[1]):
                v = x[r, c]
                k, a = np.float32(0.7978845608028654), np.float32(0.044715)
                t = _tanh(k * (v + a * v * v * v))
                out[r, c] = dy[r, c] * (np.float32(0.5) * (np.float32(1.0) + t) + np.float32(0.5) * v * (
                    np.float32(1.0) - t * t) * k * (np.float32(1.0) + np.float32(3.0) * a * v * v))
        elif code == 2:
            for c in range(x.shape[1]):
                out[r, c] = dy[r, c] if x[r, c] > 0 else np.float32(0.0)
        else:
            for c in range(x.shape[1]):
                s = np.float32(1.0) / (np.float32(1.0) + _exp(-x[r, c]))
                out[r, c] = dy[r, c] * (s * (np.float32(1.0) + x[r, c] * (np.float32(1.0) - s)))


def _rows(x):
    return np.ascontiguousarray(x, np.float32).reshape(-1, x.shape[-1])


def activation(x, act):
    """reference.ACTIVATIONS[act](x) (float32)."""
    out = np.empty(x.shape, np.float32)
    _act_rows(_rows(x), out.reshape(-1, x.shape[-1]), ACT_CODES[act])
    return out


def activation_backward(dy, x, act):
    """grad.ACTIVATION_BACKWARDS[act](dy, x) (float32)."""
    out = np.empty(x.shape, np.float32)
    _act_backward_rows(_rows(dy), _rows(x), out.reshape(-1, x.shape[-1]), ACT_CODES[act])
    return out


@nb.njit(parallel=True, **_jit)
def _adamw(p, g, m, v, decay, a1, b2, a2, step_size, c2, eps):      # all [N] float32, in place
    for i in nb.prange(p.size):                                      # a1 = 1 - b1, a2 = 1 - b2 (from float64)
        q = p[i] * decay
        mi = m[i] + a1 * (g[i] - m[i])
        vi = v[i] * b2 + a2 * g[i] * g[i]
        m[i], v[i] = mi, vi
        p[i] = q - step_size * (mi / (np.sqrt(vi) / c2 + eps))


def adamw_update(p, g, m, v, decay, b1, b2, step_size, c2, eps):
    """One AdamW update of one tensor, in place: optim.AdamW.step's loop body fused. p, m and v must be
    C-contiguous (their flat views are what the kernel writes; reshape(-1) of any other layout is a copy, and the
    update would be lost): anything else is refused."""
    f = np.float32
    if not (p.flags.c_contiguous and m.flags.c_contiguous and v.flags.c_contiguous):
        raise ValueError("adamw_update updates in place through flat views: p, m and v must be C-contiguous")
    _adamw(p.reshape(-1), np.ascontiguousarray(g, np.float32).reshape(-1), m.reshape(-1), v.reshape(-1),
           f(decay), f(1 - b1), f(b2), f(1 - b2), f(step_size), f(c2), f(eps))
