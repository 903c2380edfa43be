"""AdamW (Loshchilov & Hutter) in NumPy, step for step as torch.optim.AdamW computes it, and its schedule."""
from __future__ import annotations

import math

import numpy as np


def adamw_update(p, g, m, v, decay, b1, b2, step_size, c2, eps):
    """One tensor's update, in place, in torch's order: decay, m = lerp(m, g, 1 - b1), v = b2 v + (1 - b2) g^2,
    p -= step_size * m / (sqrt(v) / c2 + eps)."""
    f = p.dtype.type
    if decay != 1.0:
        p *= f(decay)                                                # decoupled weight decay
    m += f(1 - b1) * (g - m)
    v *= f(b2)
    v += f(1 - b2) * g * g
    p -= f(step_size) * (m / (np.sqrt(v) / f(c2) + f(eps)))


class AdamW:
    """params: {name: float32 array}, updated in place. no_decay: names left out of weight decay.
    update: the per-tensor update (`adamw_update`, or minifca.kernels.cpu_grad.adamw_update, fused)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, no_decay=(),
                 update=None):
        self.params, self.lr, self.betas, self.eps, self.weight_decay = params, lr, betas, eps, weight_decay
        self.update = update or adamw_update
        self.no_decay = set(no_decay)
        self.t = 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}   # first moments
        self.v = {k: np.zeros_like(v) for k, v in params.items()}   # second moments

    def step(self, grads, lr=None):
        lr = self.lr if lr is None else lr
        b1, b2 = self.betas
        self.t += 1
        step_size = lr / (1 - b1 ** self.t)                          # bias corrections, as torch folds them
        c2 = math.sqrt(1 - b2 ** self.t)
        for k, p in self.params.items():
            decay = 1 - lr * self.weight_decay if self.weight_decay and k not in self.no_decay else 1.0
            self.update(p, grads[k], self.m[k], self.v[k], decay, b1, b2, step_size, c2, self.eps)

    def state(self) -> dict:
        """Flat {name: array} for saving (safetensors): moments and the step count."""
        out = {f"m.{k}": v for k, v in self.m.items()} | {f"v.{k}": v for k, v in self.v.items()}
        return out | {"t": np.array([self.t], np.int64)}

    def load_state(self, state: dict):
        self.t = int(state["t"][0])
        for k in self.params:
            self.m[k][...] = state[f"m.{k}"]
            self.v[k][...] = state[f"v.{k}"]


def linear_warmup_decay(step, total, warmup):
    """The learning-rate factor at `step` (0-based): 0 -> 1 over `warmup` steps, then linearly to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def clip_grad_norm(grads, max_norm):
    """Scale {name: array} in place so their global L2 norm is at most max_norm; returns the norm before."""
    norm = math.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))
    if max_norm and norm > max_norm:
        for g in grads.values():
            g *= np.float32(max_norm / (norm + 1e-6))
    return norm
