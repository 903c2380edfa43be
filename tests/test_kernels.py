"""The Numba backend (minifca.kernels.cpu) against the NumPy reference it mirrors, function by function."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minifca
from minifca import reference as R
from minifca.errors import ConfigError
from minifca.fca import FCAConfig
from minifca.kernels import cpu as C

from conftest import SST2_DEV, f32_bound, model_bound, read_sst2, write_random_checkpoint


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def random_mask(rng, B, n):
    lengths = rng.integers(1, n + 1, B)
    return (np.arange(n)[None] < lengths[:, None]).astype(np.float32)   # [B, n], every row has a unit


def linear_params(rng, out, inp):
    return {"w": rand(rng, out, inp, scale=0.3), "b": rand(rng, out, scale=0.1)}


def maxdiff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def close(got, ref, depth=1, width=1):
    """Equal up to float32 rounding (conftest.f32_bound: `depth` chained sums of `width` terms)."""
    return maxdiff(got, ref) <= f32_bound(ref, depth, width)


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
    w = max(H, n)                 # projections sum over H, softmax and A·V over the n keys
    assert close(out, ref[0], depth=5, width=w) and close(keys, ref[3], depth=1, width=H)
    assert (probs is None) != want_probs
    if want_probs:
        assert probs.shape == (B, h, n, n) and close(probs, ref[1], depth=3, width=w)
    assert set(stats) == set(ref[2])
    for name in stats:            # statistics sum probabilities over the n queries/keys once more
        assert close(stats[name], ref[2][name], depth=4, width=w), name
    assert C.attention(x, mask, log_size, **p, n_head=h, want_probs=False)[1:3] == (None, None)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 70), st.sampled_from([(8, 1), (32, 1), (40, 1), (128, 2), (96, 3)]),
       st.integers(0, 2**31 - 1), st.booleans())
def test_attention_tiles_match_reference_across_panel_edges(B, n, head, seed, want_stats):
    """_attend's products in `_panel_tile` register tiles: keys in panels of 32 (n up to 70: one, two and three
    panels, the last one partial), values in panels of 32 of a head's d elements (d = 8, 32, 40, 64: part of a
    panel, one, one and a part, two), query rows six at a time. Against the reference on a padded batch; and
    each sequence's context is bit-identical computed alone (its rows in other blocks, other panels' padding)."""
    H, h = head
    rng = np.random.default_rng(seed)
    x, mask = rand(rng, B, n, H), random_mask(rng, B, n)
    p = {name: linear_params(rng, H, H) for name in "qkvo"}
    ref = R.attention(x, mask, None, **p, n_head=h, want_stats=want_stats)
    packed = C.pack(x, mask)
    out, probs, stats, _ = C.attention(packed, mask, None, **p, n_head=h, want_probs=True, want_stats=want_stats)
    valid = mask > 0
    w = max(H, n)                 # projections sum over H, softmax and A·V over the n keys
    assert close(out.rows, ref[0][valid], depth=5, width=w)
    assert close(probs[valid[:, None, :, None] & valid[:, None, None, :] & np.ones((1, h, 1, 1), bool)],
                 ref[1][valid[:, None, :, None] & valid[:, None, None, :] & np.ones((1, h, 1, 1), bool)],
                 depth=3, width=w)
    if want_stats:
        for name in stats:
            assert close(stats[name][valid], ref[2][name][valid], depth=4, width=w), name
    b = int(rng.integers(B))
    alone = C.attention(C.pack(x[b:b + 1], mask[b:b + 1]), mask[b:b + 1], None, **p, n_head=h, want_probs=False)[0]
    assert np.array_equal(alone.rows, out.rows[packed.start[b]:packed.start[b + 1]])


@given(shapes, st.booleans(), st.booleans())
def test_padding_free_layer_matches_reference_on_padded_batches(shape, proportional, want_probs):
    """One layer on a `Packed` batch (the valid units only) against the reference on the padded batch: the same
    values at every valid unit (attention per sequence, linear layers, LayerNorm and FFN on the valid rows);
    zeros at padding, in the probabilities and statistics too."""
    B, n, (H, h), seed = shape
    rng = np.random.default_rng(seed)
    x, mask = rand(rng, B, n, H), random_mask(rng, B, n)
    p = {name: linear_params(rng, H, H) for name in "qkvo"}
    i, o, g, b = linear_params(rng, 2 * H, H), linear_params(rng, H, 2 * H), rand(rng, H), rand(rng, H)
    log_size = np.log(rng.integers(1, 5, (B, n)).astype(np.float32)) if proportional else None
    packed = C.pack(x, mask)
    valid = mask > 0
    assert isinstance(packed, C.Packed) and packed.rows.shape == (int(valid.sum()), H)
    ref = R.attention(x, mask, log_size, **p, n_head=h, want_stats=True)
    out, probs, stats, keys = C.attention(packed, mask, log_size, **p, n_head=h, want_probs=want_probs,
                                          want_stats=True)
    w = max(H, n)                 # as in test_attention_matches_reference
    assert close(C.to_host(out)[valid], ref[0][valid], depth=5, width=w)
    assert close(C.to_host(keys)[valid], ref[3][valid], depth=1, width=H)
    assert not C.to_host(out)[~valid].any()
    if want_probs:                # valid query rows as the reference's; padded ones never computed
        assert close(probs.transpose(0, 2, 1, 3)[valid], ref[1].transpose(0, 2, 1, 3)[valid], depth=3, width=w)
        assert not probs.transpose(0, 2, 1, 3)[~valid].any()
    for name in stats:
        assert close(stats[name], ref[2][name], depth=4, width=w), name
    y = C.add_layer_norm(C.ffn(out, i, o, "gelu"), out, g, b, 1e-12)   # the rest of the layer, still packed
    want = R.add_layer_norm(R.ffn(ref[0], i, o, "gelu"), ref[0], g, b, 1e-12)
    assert isinstance(y, C.Packed) and close(C.to_host(y)[valid], want[valid], depth=9, width=max(w, 2 * H))


def test_pack_keeps_a_mask_it_cannot_pack():
    """Valid units after padding (left padding, holes) stay a padded batch, computed as the reference; a batch
    without padding packs to a view of its rows (no copy)."""
    rng = np.random.default_rng(0)
    x = rand(rng, 2, 5, 8)
    left = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], np.float32)
    assert C.pack(x, left) is x
    p = {name: linear_params(rng, 8, 8) for name in "qkvo"}
    ref = R.attention(x, left, None, **p, n_head=2)
    assert close(C.attention(C.pack(x, left), left, None, **p, n_head=2)[0], ref[0], depth=5, width=8)
    full = C.pack(x, np.ones((2, 5)))
    assert np.shares_memory(full.rows, x) and np.array_equal(C.to_host(full), x)


def test_numba_forward_multiplies_only_the_valid_rows(random_models, monkeypatch):
    """Padding-free execution end to end: every weight product of a padded batch's forward has exactly as many
    rows as the batch has valid tokens (the padded batch has 3 x 21), with FCA as many as its units left."""
    _, model = random_models
    rng = np.random.default_rng(4)
    ids, mask = rng.integers(0, 120, (3, 21)), random_mask(rng, 3, 21)
    mask[0, :] = 1
    mask[1, 5:] = 0
    rows = []
    product = C._linear
    monkeypatch.setattr(C, "_linear", lambda x2, w, b: rows.append(x2.shape[0]) or product(x2, w, b))
    monkeypatch.setattr(C, "linear", R.linear)                      # the heads' [B, H] products: not counted
    model.forward(ids, mask)
    assert set(rows) == {int(mask.sum())} and int(mask.sum()) < mask.size
    rows.clear()
    out = model.forward(ids, mask, fca=FCAConfig(keep=0.5))
    per_layer = [int(u["n_out"].sum()) for u in out.units]          # units each layer's FFN sees
    assert rows[-1] == per_layer[-1] < int(mask.sum())


@given(shapes)
def test_attention_stats_matches_reference(shape):
    B, n, (_, h), seed = shape
    rng = np.random.default_rng(seed)
    mask = random_mask(rng, B, n)
    logits = rand(rng, B, h, n, n, scale=3.0) + np.where(mask > 0, 0, R.NEG)[:, None, None, :]
    probs = R.softmax(logits)
    ref, got = R.attention_stats(probs, mask), C.attention_stats(probs, mask)
    for name in ref:              # one sum over n probabilities (entropy: of p·log p)
        assert close(got[name], ref[name], depth=1, width=n), name


@given(st.integers(1, 40), st.sampled_from([8, 24, 384]), st.integers(0, 2**31 - 1))
def test_layer_norms_match_reference(rows, H, seed):
    rng = np.random.default_rng(seed)
    x, r, g, b = rand(rng, rows, H, scale=3.0), rand(rng, rows, H), rand(rng, H), rand(rng, H)
    # mean and variance: two chained sums over H
    assert close(C.layer_norm(x, g, b, 1e-12), R.layer_norm(x, g, b, 1e-12), depth=2, width=H)
    x3, r3 = x.reshape(1, rows, H), r.reshape(1, rows, H)
    assert close(C.add_layer_norm(x3, r3, g, b, 1e-5), R.add_layer_norm(x3, r3, g, b, 1e-5), depth=2, width=H)


@pytest.mark.parametrize("act", sorted(C.ACT_CODES))
def test_ffn_matches_reference(act):
    rng = np.random.default_rng(1)
    x = rand(rng, 2, 7, 16, scale=2.0)
    p = {"i": linear_params(rng, 40, 16), "o": linear_params(rng, 16, 40)}
    assert close(C.ffn(x, **p, act=act), R.ffn(x, **p, act=act), depth=2, width=40)   # sums over 16, then 40


@given(st.integers(1, 70), st.integers(0, 40), st.integers(1, 70), st.integers(0, 2**31 - 1), st.booleans())
def test_linear_rows_match_float64_whatever_the_shape(rows, K, N, seed, read_only):
    """_linear (x @ w^T + b in 6-row by 32-output register tiles, zero-padded scratch tiles for the rows and
    outputs past the last full tile) against float64, at row and output counts on both sides of every tile and
    task edge; and each row is bit-identical to the same row computed alone or after other rows (the sums do not
    depend on the batch)."""
    rng = np.random.default_rng(seed)
    x, w, b = rand(rng, rows, K), rand(rng, N, K, scale=0.3), rand(rng, N)
    w.flags.writeable = not read_only                                             # laid out once, or per call
    got = C._linear(x, w, b)
    want = x.astype(np.float64) @ w.T.astype(np.float64) + b                        # [rows, N]
    assert got.shape == (rows, N) and got.flags.c_contiguous and got.dtype == np.float32
    # one sum of K products per output, plus the bias: Higham's bound on its own magnitudes (conftest.f32_bound)
    terms = np.abs(x).astype(np.float64) @ np.abs(w).T.astype(np.float64) + np.abs(b)
    assert (np.abs(got - want) <= (K + 1) * np.finfo(np.float32).eps * terms).all()
    r = int(rng.integers(rows))
    assert np.array_equal(C._linear(x[r:r + 1], w, b)[0], got[r])
    assert np.array_equal(C._linear(x[r:], w, b), got[r:])


def test_linear_rows_pass_non_finite_values_on():
    x = np.ones((5, 8), np.float32)
    x[1, 3], x[4, 0] = np.nan, np.inf
    w, b = np.ones((6, 8), np.float32), np.zeros(6, np.float32)
    y = C._linear(x, w, b)
    assert np.isnan(y[1]).all() and np.isposinf(y[4]).all() and (y[[0, 2, 3]] == 8).all()


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
    # three embeddings added, then LayerNorm's two sums over H
    assert close(C.embeddings(ids, tt, **p, eps=1e-12), R.embeddings(ids, tt, **p, eps=1e-12), depth=3, width=H)


# ---------------------------------------------------------------- whole models: numba backend vs numpy backend


@pytest.fixture(scope="module")
def random_models(tmp_path_factory):
    """A random classifier checkpoint (peaked attention: larger init) under both backends."""
    folder = write_random_checkpoint(tmp_path_factory.mktemp("kernels") / "ckpt", seed=3, hidden_size=48,
                                     num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
                                     vocab_size=120, max_position_embeddings=40, initializer_range=0.3,
                                     num_labels=3)
    return minifca.from_pretrained(folder, backend="numpy"), minifca.from_pretrained(folder, backend="numba")


def test_numba_model_lays_its_layer_weights_out_once(random_models):
    """from_pretrained(backend="numba") keeps the checkpoint's memory-mapped [out, in] weights in its params, as the
    numpy backend does, and lays each layer weight out once in panels for _linear_rows (kernels.cpu._laid_out: the
    same panels on every call, holding the same values)."""
    ref, fast = random_models
    for lr, lf in zip(ref.params["layers"], fast.params["layers"]):
        for part, names in (("attn", "qkvo"), ("ffn", ("i", "o"))):
            for name in names:
                wr, wf = lr[part][name]["w"], lf[part][name]["w"]
                assert isinstance(wf, np.memmap) and wf.flags.c_contiguous and np.array_equal(wr, wf)
                wp = C._laid_out(wf)
                assert wp is C._laid_out(wf) and not wp.flags.writeable
                assert np.array_equal(wp.transpose(0, 2, 1).reshape(-1, wf.shape[1])[:wf.shape[0]], wf)


def test_numba_heads_run_in_linear_rows(random_models, monkeypatch):
    """The pooler and the classifier of a numba forward go through kernels.cpu.linear (so no product of the forward
    wakes OpenBLAS's threads, whose idle spinning slowed the next forward by a quarter where NumPy was imported
    before minifca), and give the numpy backend's logits."""
    ref, fast = random_models
    calls, plain = [], C.linear
    monkeypatch.setattr(C, "linear", lambda x, w, b: calls.append(w.shape) or plain(x, w, b))
    ids = np.random.default_rng(5).integers(0, 120, (2, 9))
    got, want = fast.forward(ids), ref.forward(ids)
    assert calls == [fast.params["pooler"]["w"].shape, fast.params["classifier"]["w"].shape]
    assert within_model(got.logits, want.logits, fast.config, extra_depth=2)      # + pooler and classifier


def test_laid_out_panels_go_when_their_weight_goes():
    """The panels kept for a read-only weight do not keep it (or themselves) alive: a model dropped frees both."""
    import gc
    w = np.ones((40, 8), np.float32)
    w.flags.writeable = False
    key = id(w)
    C._linear(np.ones((2, 8), np.float32), w, np.zeros(40, np.float32))
    assert key in C._PANELS
    del w
    gc.collect()
    assert key not in C._PANELS


def test_linear_rows_see_an_update_to_a_writeable_weight():
    """Only read-only weights keep their panels: a writeable one (training's) is laid out on every call, so an
    in-place update is never hidden behind an old copy."""
    rng = np.random.default_rng(0)
    x, w, b = rand(rng, 5, 8), rand(rng, 3, 8), rand(rng, 3)
    before = C._linear(x, w, b)
    w *= 2
    after = C._linear(x, w, b)
    assert close(after - b, 2 * (before - b), depth=1, width=8) and not np.allclose(after, before)


def same_trace(ref, got):
    """Same units, same tokens kept and merged; merge weights equal to float32 precision (rounded to 6 places)."""
    assert len(ref) == len(got)
    for layer_ref, layer_got in zip(ref, got):
        for seq_ref, seq_got in zip(layer_ref, layer_got):
            assert [{k: v for k, v in u.items() if k != "weights"} for u in seq_ref] == \
                   [{k: v for k, v in u.items() if k != "weights"} for u in seq_got]
            for u, v in zip(seq_ref, seq_got):
                np.testing.assert_allclose(u["weights"], v["weights"], atol=2e-6)


def within_model(got, ref, cfg, extra_depth=0):
    """Whole-forward float32 bound (conftest.model_bound): one chain per layer, widest sum max(H, I)."""
    return maxdiff(got, ref) <= model_bound(ref, cfg, extra_depth)


def at_valid(a, mask):
    """What a forward's output means: hidden states [B, n, H] at the valid units, attentions [B, h, n, n] at the
    valid query rows. The numba backend computes nothing at padding (kernels.cpu.Packed: zeros there)."""
    valid = np.asarray(mask) > 0
    return a[valid] if a.ndim == 3 else a.transpose(0, 2, 1, 3)[valid]


def compare(ref, got, cfg):
    np.testing.assert_array_equal(got.mask, ref.mask)
    assert within_model(at_valid(got.last_hidden_state, got.mask), at_valid(ref.last_hidden_state, ref.mask), cfg)
    assert not got.last_hidden_state[got.mask == 0].any()               # padding-free: padding never computed
    assert within_model(got.logits, ref.logits, cfg, extra_depth=2)      # + pooler and classifier
    np.testing.assert_array_equal(got.sizes, ref.sizes)
    assert got.flops == ref.flops


@given(st.integers(1, 4), st.integers(1, 30), st.integers(0, 2**31 - 1))
def test_backends_agree_on_random_checkpoint(random_models, B, L, seed):
    ref_model, model = random_models
    rng = np.random.default_rng(seed)
    ids, mask, tt = rng.integers(0, 120, (B, L)), random_mask(rng, B, L), rng.integers(0, 2, (B, L))
    kw = {"attention_mask": mask, "token_type_ids": tt, "output_hidden_states": True, "output_attentions": True}
    ref, got = ref_model.forward(ids, **kw), model.forward(ids, **kw)
    compare(ref, got, model.config)
    for a, b in zip(ref.hidden_states + ref.attentions, got.hidden_states + got.attentions):
        assert within_model(at_valid(b, mask), at_valid(a, mask), model.config)


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
    compare(ref, got, model.config)
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
    compare(ref, got, model.config)
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
    r = R.bert_forward(model.params, model.config, ids, np.ones_like(ids), np.zeros_like(ids), ops=C)
    ref = ref_model.forward(ids)
    assert within_model(r["last_hidden_state"], ref.last_hidden_state, model.config)


# ---------------------------------------------------------------- more parity cases: shapes, activations, real checkpoints

CHECKPOINTS = {  # name: BertConfig fields of a random classifier checkpoint
    "bert-base-like": {"hidden_size": 768, "num_hidden_layers": 2, "num_attention_heads": 12, "intermediate_size": 3072,
                           "initializer_range": 0.06},  # larger weights: float32 noise in 768-wide sums passes 1e-5
    "gelu_new-1head": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 1, "intermediate_size": 64,
                           "hidden_act": "gelu_new"},
    "relu-odd-heads": {"hidden_size": 36, "num_hidden_layers": 3, "num_attention_heads": 3, "intermediate_size": 50,
                           "hidden_act": "relu", "type_vocab_size": 3},
    "silu-tiny-ln-eps": {"hidden_size": 24, "num_hidden_layers": 1, "num_attention_heads": 6, "intermediate_size": 24,
                             "hidden_act": "silu", "layer_norm_eps": 1e-5},
}


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def shaped_models(request, tmp_path_factory):
    shape = {"vocab_size": 200, "max_position_embeddings": 48, "initializer_range": 0.2, "num_labels": 2} | CHECKPOINTS[request.param]
    folder = write_random_checkpoint(tmp_path_factory.mktemp("shapes") / request.param, seed=11, **shape)
    return minifca.from_pretrained(folder, backend="numpy"), minifca.from_pretrained(folder, backend="numba")


def test_backends_agree_on_checkpoint_shapes(shaped_models):
    """Hidden states of every layer and logits; padding (ragged lengths) and every token type the config allows."""
    ref_model, model = shaped_models
    rng = np.random.default_rng(0)
    B, L = 3, 33
    ids, mask = rng.integers(0, 200, (B, L)), random_mask(rng, B, L)
    mask[0] = 1                                                      # one full row, others padded
    tt = rng.integers(0, model.config.type_vocab_size, (B, L))
    kw = {"attention_mask": mask, "token_type_ids": tt, "output_hidden_states": True}
    ref, got = ref_model.forward(ids, **kw), model.forward(ids, **kw)
    compare(ref, got, model.config)
    for a, b in zip(ref.hidden_states, got.hidden_states):
        assert within_model(at_valid(b, mask), at_valid(a, mask), model.config)
    fca = FCAConfig(keep=0.5)
    ref, got = ref_model.forward(ids, mask, tt, fca=fca, trace=True), model.forward(ids, mask, tt, fca=fca, trace=True)
    compare(ref, got, model.config)
    same_trace(ref.trace, got.trace)


def test_backends_agree_on_minilm(minilm_path):
    """all-MiniLM-L6-v2 (BertModel, no head): hidden states, mean-pooled embeddings, FCA traces."""
    ref_model, model = minifca.from_pretrained(minilm_path, backend="numpy"), minifca.from_pretrained(minilm_path)
    enc = model.tokenize(read_sst2(SST2_DEV, limit=6)[0])
    ref, got = ref_model(enc, output_hidden_states=True), model(enc, output_hidden_states=True)
    valid = enc.attention_mask > 0                                   # padding positions carry no meaning
    for a, b in zip(ref.hidden_states, got.hidden_states):
        assert within_model(b[valid], a[valid], model.config)
    sentences = read_sst2(SST2_DEV, limit=6)[0]
    assert within_model(model.embed(sentences), ref_model.embed(sentences), model.config, extra_depth=1)  # + pooling
    fca = FCAConfig(keep=[1.0, 0.8, 0.6, 0.5, 0.4, 0.3], aggregate="clusters", clusters=2)
    ref, got = ref_model(enc, fca=fca, trace=True), model(enc, fca=fca, trace=True)
    np.testing.assert_array_equal(got.mask, ref.mask)
    assert within_model(at_valid(got.last_hidden_state, got.mask), at_valid(ref.last_hidden_state, ref.mask), model.config)
    np.testing.assert_array_equal(got.sizes, ref.sizes)
    same_trace(ref.trace, got.trace)


# ---------------------------------------------------------------- every FCA rule x schedule, drawn by hypothesis

SCHEDULES = {  # 3 layers
    "uniform": lambda r: r,
    "linear-decay": lambda r: [1.0, (1 + r) / 2, r],
    "counts": lambda r: [max(1, round(20 * r)), max(1, round(14 * r)), max(1, round(8 * r))],
    "late-start": lambda r: r,
}
fca_configs = st.builds(
    lambda score, agg, clusters, sched, ratio, prop, seed: FCAConfig(
        keep=SCHEDULES[sched](ratio), score=score, aggregate=agg,
        clusters=clusters if agg in ("clusters", "similarity") else 1, proportional_attention=prop,
        start_layer=1 if sched == "late-start" else 0, seed=seed),
    st.sampled_from(sorted(minifca.fca.SCORES)), st.sampled_from(sorted(minifca.fca.AGGREGATES)),
    st.integers(1, 3), st.sampled_from(sorted(SCHEDULES)), st.floats(0.1, 0.9), st.booleans(), st.integers(0, 9))


@given(fca_configs, st.integers(1, 4), st.integers(2, 30), st.integers(0, 2**31 - 1))
def test_backends_agree_under_any_fca(random_models, fca, B, L, seed):
    """Same logits, hidden states, units, sizes, FLOPs and trace for any score x aggregate x schedule, any masks."""
    ref_model, model = random_models
    rng = np.random.default_rng(seed)
    ids, mask, tt = rng.integers(0, 120, (B, L)), random_mask(rng, B, L), rng.integers(0, 2, (B, L))
    ref = ref_model.forward(ids, mask, tt, fca=fca, trace=True)
    got = model.forward(ids, mask, tt, fca=fca, trace=True)
    compare(ref, got, model.config)
    same_trace(ref.trace, got.trace)
    assert [u["n_out"].tolist() for u in got.units] == [u["n_out"].tolist() for u in ref.units]


@pytest.mark.parametrize("score", sorted(minifca.fca.SCORES))
@pytest.mark.parametrize("aggregate", sorted(minifca.fca.AGGREGATES))
def test_every_score_and_aggregate_pair(random_models, score, aggregate):
    """The full grid once, on a padded batch (hypothesis above samples it; this makes sure no pair is missed)."""
    ref_model, model = random_models
    rng = np.random.default_rng(3)
    ids, mask = rng.integers(0, 120, (3, 21)), random_mask(rng, 3, 21)
    mask[0] = 1
    fca = FCAConfig(keep=0.4, score=score, aggregate=aggregate, clusters=2 if aggregate in ("clusters", "similarity") else 1)
    ref, got = ref_model.forward(ids, mask, fca=fca, trace=True), model.forward(ids, mask, fca=fca, trace=True)
    compare(ref, got, model.config)
    same_trace(ref.trace, got.trace)


def test_numba_is_deterministic_on_random_batches(random_models):
    """Bit-identical run to run, with FCA and probabilities, on a padded random batch."""
    _, model = random_models
    rng = np.random.default_rng(5)
    ids, mask = rng.integers(0, 120, (4, 30)), random_mask(rng, 4, 30)
    fca = FCAConfig(keep=0.5, aggregate="clusters", clusters=2, proportional_attention=True)
    runs = [model.forward(ids, mask, fca=fca, output_attentions=True, output_hidden_states=True) for _ in range(3)]
    for r in runs[1:]:
        assert r.logits.tobytes() == runs[0].logits.tobytes()
        assert all(a.tobytes() == b.tobytes() for a, b in zip(r.hidden_states, runs[0].hidden_states))
        assert all(a.tobytes() == b.tobytes() for a, b in zip(r.attentions, runs[0].attentions))


def test_vectorised_exp_and_erf_are_float32_accurate():
    """The libm-free exp (and the erf built on it) that the softmax and GELU loops use."""
    x = np.concatenate([np.linspace(-87, 88, 200001), [-1e30, R.NEG, -200.0, -87.5, 0.0]]).astype(np.float32)
    got, ref = C._exp_array(x), np.exp(x.astype(np.float64))
    big = ref > 1e-37
    assert (np.abs(got[big] - ref[big]) / ref[big]).max() < 2e-7
    assert (got[x < -87] == 0).all() and got[x == 0][0] == 1.0
    z = np.linspace(-6, 6, 20001).astype(np.float32)
    assert np.abs(C._erf_array(z) - R.erf(z)).max() < 2e-7


def test_openblas_thread_timeout_is_set_before_numpy_loads():
    """OpenBLAS reads OPENBLAS_THREAD_TIMEOUT when NumPy is first imported: `import minifca` sets it first
    (12, unless the environment already says otherwise)."""
    import os
    import subprocess
    import sys
    code = ("import os, sys, importlib.abc\n"
            "class Spy(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name == 'numpy':\n"
            "            print('numpy', os.environ.get('OPENBLAS_THREAD_TIMEOUT'), flush=True)\n"
            "sys.meta_path.insert(0, Spy())\n"
            "import minifca\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    run = lambda e: subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, check=True)
    assert run(env).stdout.splitlines()[0] == "numpy 12"
    assert run({**env, "OPENBLAS_THREAD_TIMEOUT": "20"}).stdout.splitlines()[0] == "numpy 20"


def test_malloc_thresholds_are_set_on_glibc_unless_the_user_chose():
    """`_process.configure` calls glibc's mallopt (True) unless MINIFCA_MALLOPT=0 or MALLOC_* thresholds are set."""
    import os
    import platform
    import subprocess
    import sys
    code = "from minifca import _process; print(_process.configure())"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "MINIFCA_MALLOPT"))}
    run = lambda e: subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,
                                   check=True).stdout.split()[-1]
    glibc = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
    assert run(env) == str(glibc)
    assert run({**env, "MINIFCA_MALLOPT": "0"}) == "False"
    assert run({**env, "MALLOC_MMAP_THRESHOLD_": "131072"}) == "False"


@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 31, 32, 33, 39, 64, 127, 128, 129, 300])
def test_the_vector_max_of_a_softmax_row_is_the_max(n):
    """`_row_max` (`_max_vectors`, LANES at a time, then halved, and the scalar rest) is the row's max exactly, wherever the max
    falls (first, last, in the tail, in any lane), with -inf and NEG (masked keys) among the values."""
    rng = np.random.default_rng(n)
    for where in [0, n - 1, int(rng.integers(n))]:
        s = rand(rng, n, scale=5.0)
        s[rng.random(n) < 0.2] = R.NEG
        s[rng.random(n) < 0.1] = -np.inf
        s[where] = 100.0
        assert C._row_max(s) == 100.0 == s.max()
    s = np.full(n, -np.inf, np.float32)
    assert C._row_max(s) == -np.inf
