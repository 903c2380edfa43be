"""kernels/cpu.reduce_batch (Numba) against fca.reduce_batch (NumPy): FCA's selection and aggregation.

Both get the same scores, so the units picked must be the same ones, in the same order, with the
same sizes; the coarse units are float64 sums cast to float32, equal up to the order of the sum.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minifca
from minifca import fca as F
from minifca.kernels import cpu

from conftest import f32_bound, model_bound

AGGREGATES = ["drop", "mean", "weighted", "clusters"]


@st.composite
def batches(draw):
    """A batch with holes or right padding, scores with many ties, sizes >= 1, plan from the mask."""
    B, n, H = draw(st.integers(1, 5)), draw(st.integers(1, 14)), draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if draw(st.booleans()):
        valid = np.arange(n)[None] < rng.integers(1, n + 1, B)[:, None]
    else:
        valid = rng.random((B, n)) < 0.7
        valid[np.arange(B), rng.integers(0, n, B)] = True
    levels = draw(st.sampled_from([2, 3, 1000]))
    s = rng.integers(0, levels, (B, n)).astype(np.float64) * draw(st.sampled_from([1.0, 0.37, 25.0]))
    x = rng.normal(size=(B, n, H)).astype(np.float32)
    sizes = (rng.integers(1, 5, (B, n)) * valid).astype(np.float32)
    aggregate = draw(st.sampled_from(AGGREGATES))
    cfg = F.FCAConfig(keep=draw(st.floats(0.05, 1.0)), aggregate=aggregate,
                      clusters=draw(st.integers(1, 4)) if aggregate == "clusters" else 1)
    plan = F.batch_plan(cfg, 0, valid.sum(1), valid)
    return s, x, sizes, valid, plan, aggregate


@settings(max_examples=300, deadline=None)
@given(batch=batches())
def test_reduce_batch_matches_the_reference(batch):
    s, x, sizes, valid, plan, aggregate = batch
    args = (s, x, sizes, valid, plan.k, plan.c, plan.active, aggregate)
    got_x, got_sizes = cpu.reduce_batch(*args)
    want_x, want_sizes = F.reduce_batch(*args)
    assert got_x.shape == want_x.shape and got_x.dtype == want_x.dtype == np.float32
    assert got_sizes.dtype == want_sizes.dtype
    np.testing.assert_array_equal(got_sizes, want_sizes)             # same units picked, same sizes
    # the coarse units are one weighted sum over <= n members (float64 in both, rounded to float32)
    assert np.abs(got_x - want_x).max(initial=0) <= f32_bound(want_x, depth=1, width=max(1, x.shape[1]))
    fine = got_x[:, :, None, :] == x[:, None, :, :]                  # fine units are exact copies
    n_keep = np.where(plan.active, plan.k, plan.n_in)
    for b in range(len(x)):
        for u in range(n_keep[b]):
            assert fine[b, u].all(-1).any()


def test_reduce_batch_picks_by_score_breaking_ties_by_position():
    """One hand-worked row: [CLS] then the best two, the earlier of equals; the rest softmax-weighted."""
    s = np.array([[0.0, 1.0, 3.0, 2.0, 3.0, 2.0]])
    x = np.arange(6, dtype=np.float32)[None, :, None] * np.ones((1, 1, 2), np.float32)  # unit j holds j
    sizes, valid = np.ones((1, 6), np.float32), np.ones((1, 6), bool)
    k, c, active = np.array([3]), np.array([1]), np.array([True])
    new_x, new_sizes = cpu.reduce_batch(s, x, sizes, valid, k, c, active, "weighted")
    e = np.exp(np.array([1.0, 2.0, 2.0]) - 2.0)                      # U = units 1, 3, 5
    coarse = (e / e.sum()) @ np.array([1.0, 3.0, 5.0])
    np.testing.assert_allclose(new_x[0, :, 0], [0, 2, 4, coarse], rtol=1e-6)
    np.testing.assert_array_equal(new_sizes, [[1, 1, 1, 3]])


def test_numba_backend_uses_the_compiled_reduction(tmp_path, monkeypatch):
    """The numba backend's eligible FCA layers go through cpu.reduce_batch, the numpy backend's do not."""
    from conftest import write_random_checkpoint
    folder = write_random_checkpoint(tmp_path, seed=2, vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=24, max_position_embeddings=20)
    calls, original = [], cpu.reduce_batch
    monkeypatch.setattr(cpu, "reduce_batch", lambda *a: calls.append(a[-1]) or original(*a))
    ids = np.arange(24).reshape(2, 12) % 50
    fca = F.FCAConfig(keep=[0.5, 0.25], aggregate="clusters", clusters=2)  # both layers shrink
    fast = minifca.from_pretrained(folder, backend="numba").forward(ids, fca=fca)
    assert calls == ["clusters", "clusters"]
    ref = minifca.from_pretrained(folder, backend="numpy").forward(ids, fca=fca)
    assert len(calls) == 2
    np.testing.assert_array_equal(fast.sizes, ref.sizes)
    assert np.abs(fast.last_hidden_state - ref.last_hidden_state).max() <= model_bound(ref.last_hidden_state, ref_model_config(folder))


def ref_model_config(folder):
    return minifca.from_pretrained(folder, backend="numpy").config


@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_reduce_batch_is_deterministic(aggregate):
    rng = np.random.default_rng(1)
    B, n, H = 16, 64, 32
    valid = np.arange(n)[None] < rng.integers(2, n + 1, B)[:, None]
    s, x = rng.random((B, n)), rng.normal(size=(B, n, H)).astype(np.float32)
    sizes = valid.astype(np.float32)
    cfg = F.FCAConfig(keep=0.3, aggregate=aggregate, clusters=3 if aggregate == "clusters" else 1)
    plan = F.batch_plan(cfg, 0, valid.sum(1), valid)
    runs = [cpu.reduce_batch(s, x, sizes, valid, plan.k, plan.c, plan.active, aggregate) for _ in range(3)]
    for a, b in itertools.pairwise(runs):
        assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
