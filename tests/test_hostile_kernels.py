"""Non-finite values reaching the Numba kernels directly: they come out as NaN/inf, never as an exception
raised from inside a compiled loop (which Numba reports as `SystemError: CPUDispatcher(...) returned a
result with an exception set`). Weights are checked at load, so this is the second line of defence."""
from __future__ import annotations

import numpy as np
import pytest

from minifca.kernels import cpu

F32 = np.float32
NONFINITE = [np.nan, np.inf, -np.inf]


@pytest.mark.parametrize("value", NONFINITE)
@pytest.mark.parametrize("where", ["one", "all"])
def test_softmax_row_with_a_zero_or_nan_sum(value, where):
    s = np.zeros(6, F32)
    s[:] = value if where == "all" else 0.0
    s[2] = value                                                     # -inf everywhere: the row's sum is 0
    cpu._softmax_row(s, np.zeros(6, F32), F32(1.0))                  # no ZeroDivisionError (it raised one)
    if where == "one" and np.isneginf(value):
        assert s[2] == 0 and abs(s.sum() - 1) < 1e-6                 # one masked logit: a normal softmax
    elif where == "all":
        assert not np.isfinite(s).all()                              # a row sum of 0 or NaN shows as NaN
    # (a single NaN logit gives whatever the fastmath loop makes of it: Model.forward checks its output)


def test_softmax_row_fully_masked_bias():
    s = np.zeros(4, F32)
    cpu._softmax_row(s, np.full(4, -np.inf, F32), F32(1.0))          # every key masked with -inf
    assert not np.isfinite(s).all()


@pytest.mark.parametrize("value", NONFINITE)
def test_attention_with_non_finite_queries(value):
    rng = np.random.default_rng(0)
    B, n, H, h = 2, 5, 8, 2
    x = rng.standard_normal((B, n, H)).astype(F32)
    w = lambda: {"w": rng.standard_normal((H, H)).astype(F32), "b": np.zeros(H, F32)}
    q, k, v, o = w(), w(), w(), w()
    q["b"][3] = value
    out, probs, stats, _ = cpu.attention(x, np.ones((B, n), F32), None, q, k, v, o, h, want_probs=True,
                                         want_stats=True)
    assert out.shape == (B, n, H) and probs.shape == (B, h, n, n)
    assert set(stats) == {"received", "cls", "entropy"}


@pytest.mark.parametrize("value", NONFINITE)
def test_layer_norms_with_non_finite_rows(value):
    x = np.ones((3, 8), F32)
    x[1, 4] = value
    g, b = np.ones(8, F32), np.zeros(8, F32)
    for out in (cpu.layer_norm(x, g, b, 1e-12), cpu.add_layer_norm(x, np.zeros_like(x), g, b, 1e-12)):
        assert not np.isfinite(out[1]).any() or not np.isfinite(out[1]).all()
        assert np.isfinite(out[[0, 2]]).all()                        # other rows untouched


def test_layer_norm_of_a_constant_row_with_zero_eps():
    """var = 0 and eps = 0: 0/0, NaN out, no ZeroDivisionError."""
    out = cpu.layer_norm(np.ones((2, 4), F32), np.ones(4, F32), np.zeros(4, F32), 0.0)
    assert np.isnan(out).all()


@pytest.mark.parametrize("act", sorted(cpu.ACT_CODES))
def test_activations_with_non_finite_values(act):
    x = np.array([[np.nan, np.inf, -np.inf, 0.0, 1e30, -1e30]], F32)
    cpu._act_rows(x, x, cpu.ACT_CODES[act])
    assert x.shape == (1, 6)


def test_exp_and_erf_of_non_finite_values():
    x = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30], F32)
    e, r = cpu._exp_array(x), cpu._erf_array(x)
    assert e[2] == 0 and e[4] == 0 and r.shape == x.shape


def test_embeddings_with_non_finite_table():
    word = np.ones((5, 4), F32)
    word[2, 1] = np.nan
    out = cpu.embeddings(np.array([[1, 2]]), np.zeros((1, 2), np.int64), word, np.zeros((3, 4), F32),
                         np.zeros((2, 4), F32), {"g": np.ones(4, F32), "b": np.zeros(4, F32)}, 1e-12)
    assert np.isfinite(out[0, 0]).all() and not np.isfinite(out[0, 1]).all()


@pytest.mark.parametrize("value", NONFINITE)
def test_stats_from_non_finite_attention(value):
    abar = np.full((1, 4, 4), 0.25, F32)
    abar[0, 1, 2] = value
    stats = cpu._stats(abar, np.ones((1, 4), F32))
    assert all(v.shape == (1, 4) for v in stats.values())


@pytest.mark.parametrize("agg", ["drop", "mean", "weighted", "clusters"])
@pytest.mark.parametrize("value", NONFINITE)
def test_reduce_batch_with_non_finite_scores_and_units(agg, value):
    B, n, H = 2, 7, 4
    s = np.linspace(0, 1, B * n).reshape(B, n)
    s[0, 3] = value
    x = np.ones((B, n, H), F32)
    x[1, 5, 2] = value
    sizes = np.ones((B, n), F32)
    sizes[0, 6] = 0.0                                                # a zero-size unit: mean divides by its group's total
    valid = np.ones((B, n), bool)
    k, c, active = np.array([3, 3]), np.array([2 if agg == "clusters" else (0 if agg == "drop" else 1)] * 2), \
        np.array([True, True])
    new_x, new_sizes = cpu.reduce_batch(s, x, sizes, valid, k, c, active, agg)
    assert new_x.shape[0] == B and new_sizes.shape == new_x.shape[:2]


def test_mean_of_a_group_of_zero_sizes():
    """Every member of size 0: 0/0 weights (NaN), no ZeroDivisionError from the compiled loop."""
    B, n, H = 1, 5, 3
    new_x, new_sizes = cpu.reduce_batch(np.arange(n, dtype=float)[None], np.ones((B, n, H), F32),
                                        np.zeros((B, n), F32), np.ones((B, n), bool), np.array([2]), np.array([1]),
                                        np.array([True]), "mean")
    assert np.isnan(new_x[0, -1]).all() and new_sizes[0, -1] == 0
