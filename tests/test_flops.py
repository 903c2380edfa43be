"""Analytic FLOPs (docs/fca.md): hand-checked counts on a tiny model, both baselines, monotone in keep."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

import minifca
from minifca import flops
from minifca.config import BertConfig

from conftest import write_random_checkpoint

# The tiny model: H = 4 hidden, h = 2 heads, I = 8 intermediate, 2 layers, C = 2 labels.
TINY = {"vocab_size": 30, "hidden_size": 4, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 8,
            "max_position_embeddings": 80}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = write_random_checkpoint(tmp_path_factory.mktemp("tiny_flops"), seed=1, initializer_range=0.3, **TINY)
    return minifca.from_pretrained(folder)


def full_layer(n, H=4, I=8):
    # projections 8nHH + QK^T and AV 4nnH + LayerNorm 2nH + FFN 4nHI + LayerNorm 2nH
    return 8 * n * H * H + 4 * n * n * H + 2 * n * H + 4 * n * H * I + 2 * n * H


def test_hand_checked_full_model(tiny):
    # n = 5 tokens, H = 4, I = 8, h = 2:
    #   embeddings    4 * 5 * 4                     =   80
    #   per layer     8*5*16 = 640, 4*25*4 = 400, 2*5*4 = 40, 4*5*4*8 = 640, 2*5*4 = 40   = 1760
    #   two layers                                  = 3520
    #   pooler 2*4*4 = 32, classifier 2*4*2 = 16    =   48
    #   total                                       = 3648
    assert full_layer(5) == 1760
    out = tiny.forward(np.arange(1, 6)[None])
    assert out.flops == out.flops_full == 3648
    # padded to 64: embeddings 4*64*4 = 1024; per layer 8*64*16 = 8192, 4*64*64*4 = 65536, 2*64*4 = 512,
    # 4*64*4*8 = 8192, 2*64*4 = 512 -> 82944; two layers 165888; heads 48; total 166960
    assert full_layer(64) == 82944
    assert tiny.forward(np.arange(1, 6)[None], pad_to=64).flops_full_padded == 166960
    # without pad_to the padded baseline is the batch's own length (7 here): row 2 pays for 7 tokens
    two = tiny.forward(np.ones((2, 7), np.int64), np.array([[1] * 5 + [0] * 2, [1] * 7]))
    assert two.flops_full == 3648 + (4 * 7 * 4 + 2 * full_layer(7) + 48)
    assert two.flops_full_padded == 2 * (4 * 7 * 4 + 2 * full_layer(7) + 48)


def test_hand_checked_fca(tiny):
    # keep 0.6 of n = 5 tokens: k = ceil(3.0) = 3 fine units (with [CLS]) at every layer.
    # weighted, layer 0: n_in 5, 2 units merged into 1 coarse -> n_out 4
    #   8*5*16 = 640, 4*25*4 = 400, LN 2*5*4 = 40, FFN 4*4*4*8 = 512, LN 2*4*4 = 32,
    #   scoring 5*5*(2+1) = 75, aggregation 2*2*4 = 16                              -> 1715
    # layer 1: n_in 4, k 3: the 1 unit left would be a coarse unit on its own, so the layer is left
    #   alone (no scoring): 8*4*16 = 512, 4*16*4 = 256, 2*4*4 = 32, 4*4*4*8 = 512, 2*4*4 = 32      -> 1344
    # total 80 + 1715 + 1344 + 48 = 3187
    ids = np.arange(1, 6)[None]
    out = tiny.forward(ids, fca=minifca.FCAConfig(keep=0.6))
    assert [int(u["n_out"][0]) for u in out.units] == [4, 4]
    assert full_layer(4) == 1344
    np.testing.assert_array_equal(flops.flops_per_layer(tiny.config, [5], out.units)[:, 0], [1715, 1344])
    assert out.flops == 3187 and out.flops_full == 3648
    # clusters with c = 2 at layer 1 would also leave the 1 unit alone; at layer 0 (m = 2 <= c) as well:
    # nothing shrinks anywhere, so this is the full model's count
    assert tiny.forward(ids, fca=minifca.FCAConfig(keep=0.6, aggregate="clusters", clusters=2)).flops == 3648
    # drop: layer 0 n_in 5 -> 3, no aggregation work:
    #   640 + 400 + 40 + FFN 4*3*4*8 = 384 + LN 2*3*4 = 24 + scoring 75                 -> 1563
    # layer 1: k = 3 = n_in, nothing to do: full_layer(3) = 384 + 144 + 24 + 384 + 24  -> 960
    # total 80 + 1563 + 960 + 48 = 2651
    out = tiny.forward(ids, fca=minifca.FCAConfig(keep=0.6, aggregate="drop"))
    assert full_layer(3) == 960
    assert out.flops == 2651


def test_counts_per_sequence_in_a_batch(tiny):
    ids = np.ones((2, 9), np.int64)
    mask = np.array([[1] * 5 + [0] * 4, [1] * 9])
    out = tiny.forward(ids, mask, fca=minifca.FCAConfig(keep=0.6), pad_to=64)
    assert out.flops_per_sequence[0] == 3187                                       # as alone: padding is free
    assert out.flops == out.flops_per_sequence.sum()
    assert out.flops_full_padded == 2 * 166960


def test_flops_are_counted_when_first_read_and_then_kept(tiny, monkeypatch):
    """A forward counts no FLOPs until one of its counts is read (embed and classify never read them); the counts
    read later are the forward's own, even after the caller's mask changes, and are made once."""
    calls = []
    real = minifca.model.model_flops
    monkeypatch.setattr(minifca.model, "model_flops", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids, mask = np.ones((2, 9), np.int64), np.array([[1] * 5 + [0] * 4, [1] * 9])
    out = tiny.forward(ids, mask, fca=minifca.FCAConfig(keep=0.6), pad_to=64)
    assert calls == []
    mask[:] = 0                                                      # the caller's array, reused
    assert out.flops_per_sequence[0] == 3187 and out.flops_full_padded == 2 * 166960
    made = len(calls)
    assert made > 0 and out.flops == out.flops_per_sequence.sum() and len(calls) == made


@pytest.fixture(scope="module")
def wider(tmp_path_factory):
    folder = write_random_checkpoint(tmp_path_factory.mktemp("wider_flops"), seed=2, vocab_size=50, hidden_size=32,
                                     num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=64, initializer_range=0.3)
    return minifca.from_pretrained(folder)


@pytest.mark.parametrize("aggregate", ["drop", "mean", "weighted", "clusters", "similarity"])
def test_flops_fall_as_keep_falls(wider, aggregate):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 50, (3, 40))
    mask = (np.arange(40)[None] < np.array([[40], [25], [12]])).astype(np.int64)
    keeps = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    c = 2 if aggregate in ("clusters", "similarity") else 1
    per_seq = np.array([wider.forward(ids, mask, fca=minifca.FCAConfig(keep=k, aggregate=aggregate, clusters=c))
                        .flops_per_sequence for k in keeps])                       # [keeps, B]
    full = wider.forward(ids, mask).flops_per_sequence
    assert (np.diff(per_seq, axis=0) <= 0).all()
    assert (per_seq <= full).all() and per_seq[0, 0] < full[0] and (per_seq[-1] < 0.5 * full).all()


@given(n=st.integers(1, 80), a=st.floats(0.05, 1.0), b=st.floats(0.05, 1.0))
def test_layer_flops_monotone_in_units(n, a, b):
    """Fewer units leaving selection (and entering the next layer) never cost more."""
    hi, lo = sorted([max(1, int(a * n)), max(1, int(b * n))], reverse=True)
    f = lambda n_out: flops.layer_flops(n, n_out, 384, 1536, 12) + flops.layer_flops(n_out, n_out, 384, 1536, 12)
    assert f(lo) <= f(hi) <= 2 * flops.layer_flops(n, n, 384, 1536, 12)


def test_minilm_shape_against_the_formula():
    cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    n, H, I = 20, 384, 1536
    expected = 4 * n * H + 6 * (8 * n * H * H + 4 * n * n * H + 4 * n * H + 4 * n * H * I)
    assert flops.model_flops(cfg, [n])[0] == expected
    assert flops.head_flops(cfg) == 2 * H * H + 2 * H * 2
