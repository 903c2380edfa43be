"""FCAState's batched fast path (`_reduce_batched`) against the per-sequence reference loop.

The reference is forced by making `fca.batchable` say no; both must give the same units, in the
same order, the same sizes and bookkeeping, and hidden states equal to float32 rounding.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minifca
from minifca import fca as F

from conftest import f32_bound, model_bound, write_random_checkpoint

LAYERS = 3
SCORES = ["attention_received", "cls_attention", "hidden_norm", "attention_entropy"]
AGGREGATES = ["drop", "mean", "weighted", "clusters"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The same random 3-layer BERT (hidden 32, 4 heads) on the numpy and the numba backend."""
    folder = write_random_checkpoint(tmp_path_factory.mktemp("tiny_batched"), seed=5, vocab_size=64, hidden_size=32,
                                     num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=48,
                                     max_position_embeddings=40, initializer_range=0.3)
    return {b: minifca.from_pretrained(folder, backend=b) for b in ("numpy", "numba")}


def reference_only(monkeypatch):
    monkeypatch.setattr(F, "batchable", lambda cfg: False)


@st.composite
def configs(draw, layers=LAYERS):
    """An eligible FCAConfig: ratio, list of ratios or list of counts; any start layer and rules."""
    kind = draw(st.sampled_from(["ratio", "ratios", "counts"]))
    if kind == "ratio":
        keep = draw(st.floats(0.05, 1.0))
    elif kind == "ratios":
        keep = sorted(draw(st.lists(st.floats(0.05, 1.0), min_size=layers, max_size=layers)), reverse=True)
    else:
        keep = sorted(draw(st.lists(st.integers(1, 12), min_size=layers, max_size=layers)), reverse=True)
    aggregate = draw(st.sampled_from(AGGREGATES))
    return F.FCAConfig(keep=keep, score=draw(st.sampled_from(SCORES)), aggregate=aggregate,
                       clusters=draw(st.integers(1, 4)) if aggregate == "clusters" else 1,
                       proportional_attention=draw(st.booleans()), start_layer=draw(st.integers(0, layers - 1)))


@st.composite
def masks(draw, max_b=4, max_len=12):
    """[B, L] masks: right-padded, or with holes anywhere (every row keeps at least one unit)."""
    B, L = draw(st.integers(1, max_b)), draw(st.integers(1, max_len))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    if draw(st.booleans()):
        mask = (np.arange(L)[None] < rng.integers(1, L + 1, B)[:, None])
    else:
        mask = rng.random((B, L)) < 0.7
        mask[np.arange(B), rng.integers(0, L, B)] = True
    return mask.astype(np.int64), seed


def assert_same_units(fast, ref):
    assert len(fast) == len(ref)
    for a, b in zip(fast, ref):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
            assert np.asarray(a[name]).dtype == np.asarray(b[name]).dtype, name


# ---------------------------------------------------------------- selection alone, ties everywhere


@settings(max_examples=200)
@given(mk=masks(max_b=6, max_len=16), levels=st.integers(1, 3), ks=st.lists(st.integers(1, 16), min_size=6, max_size=6))
def test_selection_matches_select_with_ties(mk, levels, ks):
    """Scores drawn from a few levels only: ties at the cut must go to the earlier unit, as in `select`."""
    mask, seed = mk
    rng = np.random.default_rng(seed)
    s = rng.integers(0, levels, mask.shape).astype(np.float64)
    valid = mask > 0
    k = np.array([min(kb, int(v.sum())) for kb, v in zip(ks, valid)])
    fine = F._select_batched(s, valid, k)
    for b, v in enumerate(valid):
        idx = np.flatnonzero(v)
        np.testing.assert_array_equal(np.flatnonzero(fine[b]), idx[F.select(s[b, idx], k[b])])


# ---------------------------------------------------------------- one layer after another, on the state


def run_state(cfg, mask, x, sizes, stats, keys, layers):
    state = F.FCAState.start(mask, None, False)
    outs = []
    for layer in range(layers):
        if not cfg.active(layer):
            continue
        x, mask, sizes = state.reduce(layer, cfg, x, mask, sizes, {k: v[:, :x.shape[1]] for k, v in stats.items()},
                                      keys[:, :x.shape[1]])
        outs.append((x, mask, sizes, list(state.n_fine)))
    return outs, state


@given(cfg=configs(), mk=masks(), ties=st.booleans())
def test_state_reduce_matches_the_reference(cfg, mk, ties):
    """Random hidden states and statistics (rounded to one decimal: many ties), several layers in a row."""
    mask, seed = mk
    rng = np.random.default_rng(seed)
    B, L = mask.shape
    x = rng.normal(size=(B, L, 8)).astype(np.float32)
    stats = {k: rng.random((B, L)).astype(np.float32) for k in ("received", "cls", "entropy")}
    if ties:
        stats = {k: np.floor(3 * v) for k, v in stats.items()}          # three levels: ties at every cut
        x = np.round(x)
    keys = rng.normal(size=(B, L, 8)).astype(np.float32)
    fast, fast_state = run_state(cfg, mask, x, mask.copy(), stats, keys, LAYERS)
    with pytest.MonkeyPatch.context() as mp:
        reference_only(mp)
        ref, ref_state = run_state(cfg, mask, x, mask.copy(), stats, keys, LAYERS)
    assert len(fast) == len(ref)
    for (fx, fm, fs, fn), (rx, rm, rs, rn) in zip(fast, ref):
        assert fx.shape == rx.shape and fx.dtype == rx.dtype
        np.testing.assert_array_equal(fm, rm)
        assert fm.dtype == rm.dtype and fs.dtype == rs.dtype
        np.testing.assert_array_equal(fs, rs)
        assert fn == rn
        assert np.abs(fx - rx).max(initial=0) <= f32_bound(rx, depth=1, width=rx.shape[1])   # one weighted sum over <= n units
    assert_same_units(fast_state.units, ref_state.units)


def test_identity_input_gives_the_exact_merge_matrix(monkeypatch):
    """The CUDA backend hands `reduce` the identity (float64, broadcast) to get the merge matrix."""
    rng = np.random.default_rng(0)
    mask = np.array([[1] * 9 + [0] * 3, [1] * 12, [1] * 4 + [0] * 8])
    eye = np.broadcast_to(np.eye(12), (3, 12, 12))
    stats = {k: rng.random((3, 12)).astype(np.float32) for k in ("received", "cls", "entropy")}
    keys = np.zeros((3, 12, 0), np.float32)
    cfg = F.FCAConfig(keep=0.4, aggregate="clusters", clusters=2)
    fast = F.FCAState.start(mask, None, False).reduce(1, cfg, eye, mask, mask.copy(), stats, keys)
    reference_only(monkeypatch)
    ref = F.FCAState.start(mask, None, False).reduce(1, cfg, eye, mask, mask.copy(), stats, keys)
    assert fast[0].dtype == ref[0].dtype == np.float64
    assert np.abs(fast[0] - ref[0]).max() <= 1e-15
    for a, b in zip(fast[1:], ref[1:]):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- whole forwards, both CPU backends


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@settings(max_examples=10)
@given(cfg=configs(), mk=masks())
def test_forward_matches_the_reference(models, backend, cfg, mk):
    model = models[backend]
    mask, seed = mk
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 64, mask.shape)
    tt = rng.integers(0, 2, mask.shape)
    fast = model.forward(ids, mask, tt, fca=cfg, output_hidden_states=True)
    with pytest.MonkeyPatch.context() as mp:
        reference_only(mp)
        ref = model.forward(ids, mask, tt, fca=cfg, output_hidden_states=True)
    np.testing.assert_array_equal(fast.mask, ref.mask)
    np.testing.assert_array_equal(fast.sizes, ref.sizes)
    assert_same_units(fast.units, ref.units)
    assert fast.flops == ref.flops and fast.flops_full == ref.flops_full
    assert np.abs(fast.last_hidden_state - ref.last_hidden_state).max() <= model_bound(ref.last_hidden_state, model.config)
    assert np.abs(fast.logits - ref.logits).max() <= model_bound(ref.logits, model.config, extra_depth=2)
    for a, b in zip(fast.hidden_states, ref.hidden_states):
        assert a.shape == b.shape and np.abs(a - b).max() <= model_bound(b, model.config)


# ---------------------------------------------------------------- when the fast path runs


def count_fast_calls(monkeypatch):
    calls, original = [], F.FCAState._reduce_batched

    def spy(self, *args):
        calls.append(args[0])
        return original(self, *args)
    monkeypatch.setattr(F.FCAState, "_reduce_batched", spy)
    return calls


def test_fast_path_is_taken_only_when_eligible(models, monkeypatch):
    model = models["numba"]
    ids = np.arange(20).reshape(2, 10) % 64
    calls = count_fast_calls(monkeypatch)
    model.forward(ids, fca=F.FCAConfig(keep=[0.6, 0.3, 0.1], aggregate="clusters", clusters=2))
    assert calls == [0, 1, 2]                                        # every layer (each shrinks), batched
    for cfg, kw in [(F.FCAConfig(keep=0.5, score="random"), {}),
                    (F.FCAConfig(keep=0.5, aggregate="similarity"), {}),
                    (F.FCAConfig(keep=0.5), {"trace": True})]:
        calls.clear()
        model.forward(ids, fca=cfg, **kw)
        assert calls == [], cfg
    # a rule re-registered under a built-in name is not the built-in: the reference loop runs it
    monkeypatch.setitem(F.SCORES, "attention_received", lambda stats, x, keys, rng: -stats["received"])
    monkeypatch.setitem(F.AGGREGATES, "mean", lambda scores, sizes, keys, c: F.weighted(scores, sizes, keys, c))
    for cfg in (F.FCAConfig(keep=0.5), F.FCAConfig(keep=0.5, score="hidden_norm", aggregate="mean")):
        calls.clear()
        model.forward(ids, fca=cfg)
        assert calls == [], cfg
    assert not F.batchable(F.FCAConfig(keep=0.5))


def test_a_rule_registered_in_one_place_takes_the_fast_paths(models, new_rules, monkeypatch):
    """`new_rules` registers a score and an aggregate with batched facts, and nothing else: the numba
    backend decides their layers batched, by its compiled reduction, with the per-sequence loop's units;
    ablate's grid hands the multi-unit one its clusters."""
    from minifca import ablate
    from minifca.kernels import cpu
    score, aggregate = new_rules
    cfg = F.FCAConfig(keep=[0.5, 0.25, 0.1], score=score, aggregate=aggregate, clusters=2)  # each layer shrinks
    assert F.batchable(cfg)
    fast, compiled, original = count_fast_calls(monkeypatch), [], cpu.reduce_batch
    monkeypatch.setattr(cpu, "reduce_batch", lambda *a: compiled.append(a[-1]) or original(*a))
    ids = np.arange(2, 26).reshape(2, 12) % 64
    got = models["numba"].forward(ids, fca=cfg)
    assert fast == list(range(LAYERS)) and compiled == [aggregate] * LAYERS
    want = models["numpy"].forward(ids, fca=cfg, trace=True)             # the reference loop, one sequence at a time
    assert np.array_equal(got.mask, want.mask) and got.mask.shape[1] < ids.shape[1]
    np.testing.assert_array_equal(got.sizes, want.sizes)
    assert np.abs(got.last_hidden_state - want.last_hidden_state).max() <= model_bound(want.last_hidden_state,
                                                                                      models["numpy"].config)
    (label, _, row), = ablate.grid(LAYERS, [score], [aggregate], [0.5], clusters=3)
    assert row.clusters == 3 and label.endswith("-3")


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("aggregate", ["weighted", "drop", "clusters"])
def test_layers_a_reduction_would_leave_alone_are_not_reduced(models, backend, aggregate, monkeypatch):
    """After a uniform keep's one cut, each sequence has only its coarse units left to merge (none for drop):
    `leaves_alone` says so from the mask, and those layers run without statistics or a reduce. The result is
    the forward that reduces them anyway, to the bit: the units, sizes, FLOPs and every hidden state."""
    model = models[backend]
    ids = np.arange(3, 27).reshape(2, 12) % 64                       # no padding: the skip applies
    cfg = F.FCAConfig(keep=0.5, aggregate=aggregate, clusters=2 if aggregate == "clusters" else 1)
    reduced, stats_asked, attention = [], [], model.ops.attention
    original = F.FCAState.reduce
    monkeypatch.setattr(F.FCAState, "reduce", lambda self, layer, *a, **k: reduced.append(layer) or original(self, layer, *a, **k))
    monkeypatch.setattr(model.ops, "attention", lambda *a, **k: stats_asked.append(k["want_stats"]) or attention(*a, **k))
    fast = model.forward(ids, fca=cfg, output_hidden_states=True)
    assert reduced == [0] and stats_asked == [True, False, False]
    reduced.clear()
    monkeypatch.setattr(F.FCAState, "leaves_alone", lambda self, *a: False)
    every = model.forward(ids, fca=cfg, output_hidden_states=True)
    assert reduced == [0, 1, 2]
    assert_same_units(fast.units, every.units)
    assert fast.flops == every.flops
    np.testing.assert_array_equal(fast.mask, every.mask)
    np.testing.assert_array_equal(fast.sizes, every.sizes)
    for a, b in zip(fast.hidden_states, every.hidden_states):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fast.logits, every.logits)


def test_leaves_alone_only_where_the_reduction_is_the_identity():
    mask = np.ones((2, 7), np.float32)
    state = F.FCAState.start(np.ones((2, 12), np.float32), None, False)  # 12 tokens, cut to 6 fine + 1 coarse
    cfg = F.FCAConfig(keep=0.5)
    assert state.leaves_alone(1, cfg, mask) and state.leaves_alone(2, cfg, mask)  # (the second from the first's)
    assert not state.leaves_alone(2, F.FCAConfig(keep=0.5, aggregate="drop"), mask)  # drop: the coarse unit goes
    assert not state.leaves_alone(0, cfg, np.ones((2, 12), np.float32))  # the cut itself
    assert not state.leaves_alone(1, F.FCAConfig(keep=[0.5, 0.25, 0.1]), mask)  # a schedule that shrinks again
    padded = mask.copy()
    padded[1, 6] = 0                                                 # padding: a reduce would re-pack it
    assert not state.leaves_alone(1, cfg, padded)
    assert not F.FCAState.start(np.ones((2, 12), np.float32), None, True).leaves_alone(1, cfg, mask)  # a trace


def test_a_layer_plans_once_for_its_leaves_alone_and_its_reduce(monkeypatch):
    """`leaves_alone`'s batch_plan is the one `reduce` uses for the same layer and mask: one plan per layer that
    is asked, and a new one when the mask (or the layer) differs."""
    plans = []
    real = F.batch_plan
    monkeypatch.setattr(F, "batch_plan", lambda *a: plans.append(a[1]) or real(*a))
    rng = np.random.default_rng(0)
    B, n, H = 2, 12, 8
    mask = np.ones((B, n), np.float32)
    state, cfg = F.FCAState.start(mask, None, False), F.FCAConfig(keep=0.5)
    x, sizes = rng.standard_normal((B, n, H)).astype(np.float32), mask.copy()
    stats = {"received": rng.random((B, n)).astype(np.float32)}
    assert not state.leaves_alone(0, cfg, mask)
    _, new_mask, _ = state.reduce(0, cfg, x, mask, sizes, stats, x)
    assert plans == [0]
    want = real(cfg, 0, state.n_tokens, mask > 0)                    # the plan reduce used: the same counts
    assert new_mask.shape == (B, int(want.n_out.max()))
    other = mask.copy()
    other[1, -1] = 0                                                 # another mask at the same layer: planned anew
    state.reduce(0, cfg, x, other, sizes, stats, x)
    assert plans == [0, 0]
