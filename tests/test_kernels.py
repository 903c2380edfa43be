"""The Numba backend (minifca.kernels.cpu) against the NumPy reference it mirrors, function by function."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

import minifca
from minifca import reference as R
from minifca.errors import ConfigError
from minifca.fca import FCAConfig
from minifca.kernels import cpu as C

from conftest import SST2_DEV, read_sst2, write_random_checkpoint

TOL = 1e-5


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def random_mask(rng, B, n):
    lengths = rng.integers(1, n + 1, B)
    return (np.arange(n)[None] < lengths[:, None]).astype(np.float32)   # [B, n], every row has a unit


def linear_params(rng, out, inp):
    return {"w": rand(rng, out, inp, scale=0.3), "b": rand(rng, out, scale=0.1)}


def maxdiff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# ---------------------------------------------------------------- kernel by kernel

shapes = st.tuples(st.integers(1, 3), st.integers(1, 19), st.sampled_from([(8, 1), (16, 2), (24, 4)]),
                   st.integers(0, 2**31 - 1))


@given(shapes, st.booleans(), st.booleans())
def test_attention_matches_reference(shape, proportional, want_probs):
    B, n, (H, h), seed = shape
    rng = np.random.default_rng(seed)
    x, mask = rand(rng, B, n, H), random_mask(rng, B, n)
    p = {name: linear_params(rng, H, H) for name in "qkvo"}
    log_size = np.log(rng.integers(1, 5, (B, n)).astype(np.float32)) if proportional else None
    ref = R.attention(x, mask, log_size, **p, n_head=h, want_stats=True)
    out, probs, stats, keys = C.attention(x, mask, log_size, **p, n_head=h, want_probs=want_probs, want_stats=True)
    assert maxdiff(out, ref[0]) <= TOL and maxdiff(keys, ref[3]) <= TOL
    assert (probs is None) != want_probs
    if want_probs:
        assert probs.shape == (B, h, n, n) and maxdiff(probs, ref[1]) <= TOL
    assert set(stats) == set(ref[2])
    for name in stats:
        assert maxdiff(stats[name], ref[2][name]) <= TOL, name
    assert C.attention(x, mask, log_size, **p, n_head=h, want_probs=False)[1:3] == (None, None)


@given(shapes)
def test_attention_stats_matches_reference(shape):
    B, n, (_, h), seed = shape
    rng = np.random.default_rng(seed)
    mask = random_mask(rng, B, n)
    logits = rand(rng, B, h, n, n, scale=3.0) + np.where(mask > 0, 0, R.NEG)[:, None, None, :]
    probs = R.softmax(logits)
    ref, got = R.attention_stats(probs, mask), C.attention_stats(probs, mask)
    for name in ref:
        assert maxdiff(got[name], ref[name]) <= TOL, name


@given(st.integers(1, 40), st.sampled_from([8, 24, 384]), st.integers(0, 2**31 - 1))
def test_layer_norms_match_reference(rows, H, seed):
    rng = np.random.default_rng(seed)
    x, r, g, b = rand(rng, rows, H, scale=3.0), rand(rng, rows, H), rand(rng, H), rand(rng, H)
    assert maxdiff(C.layer_norm(x, g, b, 1e-12), R.layer_norm(x, g, b, 1e-12)) <= TOL
    x3, r3 = x.reshape(1, rows, H), r.reshape(1, rows, H)
    assert maxdiff(C.add_layer_norm(x3, r3, g, b, 1e-5), R.add_layer_norm(x3, r3, g, b, 1e-5)) <= TOL


@pytest.mark.parametrize("act", sorted(C.ACT_CODES))
def test_ffn_matches_reference(act):
    rng = np.random.default_rng(1)
    x = rand(rng, 2, 7, 16, scale=2.0)
    p = {"i": linear_params(rng, 40, 16), "o": linear_params(rng, 16, 40)}
    assert maxdiff(C.ffn(x, **p, act=act), R.ffn(x, **p, act=act)) <= TOL


def test_ffn_refuses_unknown_activation():
    rng = np.random.default_rng(0)
    p = {"i": linear_params(rng, 8, 4), "o": linear_params(rng, 4, 8)}
    with pytest.raises(ConfigError, match="hidden_act 'mish'"):
        C.ffn(rand(rng, 1, 2, 4), **p, act="mish")


@given(st.integers(1, 3), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_embeddings_match_reference(B, L, seed):
    rng = np.random.default_rng(seed)
    H, V = 16, 30
    p = {"word": rand(rng, V, H), "position": rand(rng, 20, H), "token_type": rand(rng, 2, H),
         "ln": {"g": rand(rng, H), "b": rand(rng, H)}}
    ids, tt = rng.integers(0, V, (B, L)), rng.integers(0, 2, (B, L))
    assert maxdiff(C.embeddings(ids, tt, **p, eps=1e-12), R.embeddings(ids, tt, **p, eps=1e-12)) <= TOL


# ---------------------------------------------------------------- whole models: numba backend vs numpy backend


@pytest.fixture(scope="module")
def random_models(tmp_path_factory):
    """A random classifier checkpoint (peaked attention: larger init) under both backends."""
    folder = write_random_checkpoint(tmp_path_factory.mktemp("kernels") / "ckpt", seed=3, hidden_size=48,
                                     num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
                                     vocab_size=120, max_position_embeddings=40, initializer_range=0.3,
                                     num_labels=3)
    return minifca.from_pretrained(folder, backend="numpy"), minifca.from_pretrained(folder, backend="numba")


def same_trace(ref, got):
    """Same units, same tokens kept and merged; merge weights equal to float32 precision (rounded to 6 places)."""
    assert len(ref) == len(got)
    for layer_ref, layer_got in zip(ref, got):
        for seq_ref, seq_got in zip(layer_ref, layer_got):
            assert [{k: v for k, v in u.items() if k != "weights"} for u in seq_ref] == \
                   [{k: v for k, v in u.items() if k != "weights"} for u in seq_got]
            for u, v in zip(seq_ref, seq_got):
                np.testing.assert_allclose(u["weights"], v["weights"], atol=2e-6)


def compare(ref, got):
    assert maxdiff(got.last_hidden_state, ref.last_hidden_state) <= TOL
    assert maxdiff(got.logits, ref.logits) <= TOL
    np.testing.assert_array_equal(got.mask, ref.mask)
    np.testing.assert_array_equal(got.sizes, ref.sizes)
    assert got.flops == ref.flops


@given(st.integers(1, 4), st.integers(1, 30), st.integers(0, 2**31 - 1))
def test_backends_agree_on_random_checkpoint(random_models, B, L, seed):
    ref_model, model = random_models
    rng = np.random.default_rng(seed)
    ids, mask, tt = rng.integers(0, 120, (B, L)), random_mask(rng, B, L), rng.integers(0, 2, (B, L))
    kw = dict(attention_mask=mask, token_type_ids=tt, output_hidden_states=True, output_attentions=True)
    ref, got = ref_model.forward(ids, **kw), model.forward(ids, **kw)
    compare(ref, got)
    for a, b in zip(ref.hidden_states + ref.attentions, got.hidden_states + got.attentions):
        assert maxdiff(a, b) <= TOL


FCA_CASES = [
    FCAConfig(keep=0.5),
    FCAConfig(keep=0.6, score="cls_attention", aggregate="mean", proportional_attention=True),
    FCAConfig(keep=0.4, score="hidden_norm", aggregate="drop"),
    FCAConfig(keep=0.5, score="attention_entropy", aggregate="clusters", clusters=2, start_layer=1),
    FCAConfig(keep=0.7, score="random", aggregate="similarity", clusters=2, seed=5),
    FCAConfig(keep=[8, 6, 3], aggregate="weighted", proportional_attention=True),
    FCAConfig(keep=[1.0, 0.7, 0.3]),
]


@pytest.mark.parametrize("fca", FCA_CASES, ids=lambda f: f"{f.score}-{f.aggregate}-{f.keep}")
def test_backends_agree_under_fca_on_random_checkpoint(random_models, fca):
    ref_model, model = random_models
    rng = np.random.default_rng(7)
    ids, mask = rng.integers(0, 120, (4, 25)), random_mask(rng, 4, 25)
    ref = ref_model.forward(ids, mask, fca=fca, trace=True)
    got = model.forward(ids, mask, fca=fca, trace=True)
    compare(ref, got)
    same_trace(ref.trace, got.trace)


@pytest.fixture(scope="module")
def sst2_models(sst2_path):
    return minifca.from_pretrained(sst2_path, backend="numpy"), minifca.from_pretrained(sst2_path, backend="numba")


@pytest.mark.parametrize("fca", [FCAConfig(keep=0.5), FCAConfig(keep=0.3, aggregate="clusters", clusters=3),
                                 FCAConfig(keep=0.5, score="cls_attention", proportional_attention=True)],
                         ids=lambda f: f"{f.score}-{f.aggregate}-{f.keep}")
def test_backends_agree_under_fca_on_sst2(sst2_models, fca):
    """A fine-tuned checkpoint on real sentences: same tokens kept and merged, same logits."""
    ref_model, model = sst2_models
    enc = ref_model.tokenize(read_sst2(SST2_DEV, limit=8)[0])
    ref, got = ref_model(enc, fca=fca, trace=True), model(enc, fca=fca, trace=True)
    compare(ref, got)
    same_trace(ref.trace, got.trace)
    assert got.flops < ref.flops_full


def test_numba_is_deterministic(sst2_models):
    _, model = sst2_models
    enc = model.tokenize(read_sst2(SST2_DEV, limit=16)[0])
    a, b = model(enc, fca=FCAConfig(keep=0.5)), model(enc, fca=FCAConfig(keep=0.5))
    assert a.last_hidden_state.tobytes() == b.last_hidden_state.tobytes()
    assert a.logits.tobytes() == b.logits.tobytes()
    full = [model(enc, output_attentions=True) for _ in range(2)]
    assert full[0].last_hidden_state.tobytes() == full[1].last_hidden_state.tobytes()
    assert all(x.tobytes() == y.tobytes() for x, y in zip(full[0].attentions, full[1].attentions))


def test_bert_forward_defaults_to_numba_ops(random_models):
    ref_model, model = random_models
    ids = np.arange(10)[None] + 3
    r = C.bert_forward(model.params, model.config, ids, np.ones_like(ids), np.zeros_like(ids))
    ref = ref_model.forward(ids)
    assert maxdiff(r["last_hidden_state"], ref.last_hidden_state) <= TOL
