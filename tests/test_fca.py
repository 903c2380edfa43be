"""FCA in the NumPy reference (docs/fca.md): selection, aggregation, sizes, batching, schedules, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, strategies as st

import minifca
from minifca import fca as F
from minifca.cli import main
from minifca.errors import ConfigError

from conftest import assert_f32_close, model_bound, write_random_checkpoint

LAYERS = 3
MERGING = ["mean", "weighted", "clusters", "similarity"]
RULES = [(s, a) for s in F.SCORES for a in F.AGGREGATES]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 3-layer BERT (hidden 32, 4 heads) with a classifier head."""
    folder = write_random_checkpoint(tmp_path_factory.mktemp("tiny_fca"), seed=3, vocab_size=64, hidden_size=32,
                                     num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=48,
                                     max_position_embeddings=40, initializer_range=0.3)  # peaky attention: no near-ties
    return minifca.from_pretrained(folder)


def batch(lengths, seed=0, L=None, vocab=64):
    """ids, mask, token types of a right-padded batch; the padding holds arbitrary ids and types."""
    rng = np.random.default_rng(seed)
    L = L or max(lengths)
    ids = rng.integers(0, vocab, (len(lengths), L))
    tt = rng.integers(0, 2, (len(lengths), L))
    mask = (np.arange(L)[None] < np.array(lengths)[:, None]).astype(np.int64)
    return ids, mask, tt


def cfg_for(score, aggregate, **kw):
    c = 2 if aggregate in ("clusters", "similarity") else 1
    return F.FCAConfig(score=score, aggregate=aggregate, clusters=kw.pop("clusters", c), **kw)


def capture(monkeypatch):
    """Record every FCAState.reduce call: (layer, cfg, inputs x/mask/sizes, outputs x/mask/sizes, state)."""
    calls, original = [], F.FCAState.reduce

    def spy(self, layer, cfg, x, mask, sizes, stats, keys, ops=None):
        out = original(self, layer, cfg, x, mask, sizes, stats, keys, ops)
        calls.append((layer, cfg, x.copy(), mask.copy(), sizes.copy(), *out, self))
        return out
    monkeypatch.setattr(F.FCAState, "reduce", spy)
    return calls


def expected_coarse(aggregate, clusters, m):
    return 0 if aggregate == "drop" else min(m, clusters if aggregate in ("clusters", "similarity") else 1)


# ---------------------------------------------------------------- keep = 1.0 is the plain model


@pytest.mark.parametrize("score,aggregate", RULES)
@pytest.mark.parametrize("proportional", [False, True])
def test_keep_one_is_the_plain_forward(tiny, score, aggregate, proportional):
    ids, mask, tt = batch([9, 5, 12], seed=1)
    plain = tiny.forward(ids, mask, tt)
    for keep in (1.0, [1.0] * LAYERS):
        out = tiny.forward(ids, mask, tt, fca=cfg_for(score, aggregate, keep=keep, proportional_attention=proportional))
        assert np.abs(out.last_hidden_state - plain.last_hidden_state).max() <= model_bound(plain.last_hidden_state, tiny.config)
        assert np.abs(out.logits - plain.logits).max() <= model_bound(plain.logits, tiny.config, extra_depth=2)
        np.testing.assert_array_equal(out.mask, plain.mask)
        np.testing.assert_array_equal(out.sizes, mask)
        assert out.flops == out.flops_full == plain.flops


# ---------------------------------------------------------------- one reduction step, in the model


SCHEDULES = [{"keep": 0.5}, {"keep": [0.9, 0.6, 0.3]}, {"keep": [7, 5, 2]}, {"keep": 0.4, "start_layer": 1},
             {"keep": 0.3, "proportional_attention": True}]


@pytest.mark.parametrize("score,aggregate", RULES)
@pytest.mark.parametrize("schedule", SCHEDULES, ids=str)
def test_each_reduction_keeps_the_invariants(tiny, monkeypatch, score, aggregate, schedule):
    calls = capture(monkeypatch)
    lengths = [11, 4, 16, 1]
    ids, mask, tt = batch(lengths, seed=2)
    cfg = cfg_for(score, aggregate, **schedule)
    tiny.forward(ids, mask, tt, fca=cfg, trace=True)
    assert [c[0] for c in calls] == [l for l in range(LAYERS) if cfg.active(l)]
    for layer, cfg, x, m, s, x2, m2, s2, state in calls:
        for b, n_tokens in enumerate(lengths):
            n_in, n_out = int(m[b].sum()), int(m2[b].sum())
            np.testing.assert_array_equal(m2[b], np.arange(m2.shape[1]) < n_out)   # valid units first
            assert np.all(x2[b, n_out:] == 0) and np.all(s2[b, n_out:] == 0)      # padding is zero
            k = cfg.k(layer, n_tokens, n_in)
            v = cfg.keep[layer] if isinstance(cfg.keep, list) else cfg.keep
            assert k == max(1, min(n_in, v if cfg.counts else int(np.ceil(v * n_tokens - 1e-9))))  # with [CLS]
            if k >= n_in:
                assert n_out == n_in
            else:
                assert n_out == k + expected_coarse(aggregate, cfg.clusters, n_in - k) <= n_in
            np.testing.assert_array_equal(x2[b, 0], x[b, 0])                       # [CLS] is unit 0
            assert s2[b, 0] == s[b, 0] == 1
            if aggregate == "drop":                                                # sizes: the tokens kept
                assert s2[b, :n_out].sum() <= s[b, :n_in].sum()
                rows = [np.flatnonzero((x[b, :n_in] == x2[b, u]).all(1)) for u in range(n_out)]
                assert all(len(r) >= 1 for r in rows)                              # every unit an input unit
            else:
                assert s2[b].sum() == n_tokens                                     # sizes: every input token
                lo, hi = x[b, :n_in].min(0), x[b, :n_in].max(0)                    # averages stay in the hull
                assert (x2[b, :n_out] >= lo - 1e-6).all() and (x2[b, :n_out] <= hi + 1e-6).all()
    for L in calls[-1][-1].trace:                                                  # trace: never padding
        for b, units in enumerate(L):
            assert units[0]["tokens"] == [0]
            held = [t for u in units for t in u["tokens"]]
            assert len(held) == len(set(held)) and all(t < lengths[b] for t in held)
            for u in units:
                assert u["size"] == len(u["tokens"]) and min(u["weights"]) >= 0
                assert abs(sum(u["weights"]) - 1) < 1e-5


@pytest.mark.parametrize("aggregate", list(F.AGGREGATES))
def test_sizes_sum_to_tokens_through_all_layers(tiny, aggregate):
    ids, mask, tt = batch([14, 9, 3], seed=4)
    out = tiny.forward(ids, mask, tt, fca=cfg_for("attention_received", aggregate, keep=[0.8, 0.5, 0.3]), trace=True)
    held = [sum(u["size"] for u in units) for units in out.trace[-1]]
    np.testing.assert_array_equal(out.sizes.sum(1), held)
    if aggregate == "drop":
        np.testing.assert_array_equal(held, [len(u) for u in out.trace[-1]])      # only fine tokens remain
        np.testing.assert_array_equal(held, [np.ceil(0.3 * n - 1e-9) for n in (14, 9, 3)])
    else:
        np.testing.assert_array_equal(held, [14, 9, 3])


def test_drop_at_the_last_layer_matches_the_plain_forward(tiny):
    """Independent check of the score and the selection: PoWER-BERT at the last layer keeps the plain
    model's rows of the k tokens that receive most attention (computed here from its attentions)."""
    ids, mask, tt = batch([13, 8], seed=5)
    plain = tiny.forward(ids, mask, tt, output_attentions=True)
    out = tiny.forward(ids, mask, tt, fca=F.FCAConfig(keep=0.5, aggregate="drop", start_layer=LAYERS - 1))
    for b, n in enumerate((13, 8)):
        abar = plain.attentions[-1][b].mean(0)[:n, :n]                            # [n, n]
        received = abar.sum(0) - np.diag(abar)                                    # s_j = sum_i A[i, j] - A[j, j]
        k = int(np.ceil(0.5 * n))
        kept = np.sort(np.concatenate([[0], 1 + np.argsort(-received[1:], kind="stable")[:k - 1]]))
        assert out.mask[b].sum() == k
        want = plain.last_hidden_state[b, kept]
        np.testing.assert_allclose(out.last_hidden_state[b, :k], want, rtol=0, atol=model_bound(want, tiny.config))


def test_proportional_attention_changes_later_layers_only(tiny):
    ids, mask, tt = batch([12], seed=6)
    a = tiny.forward(ids, mask, tt, fca=F.FCAConfig(keep=0.5), output_hidden_states=True)
    b = tiny.forward(ids, mask, tt, fca=F.FCAConfig(keep=0.5, proportional_attention=True), output_hidden_states=True)
    np.testing.assert_array_equal(a.hidden_states[1], b.hidden_states[1])         # sizes are all 1 at layer 0
    assert np.abs(a.last_hidden_state - b.last_hidden_state).max() > 1e-4


# ---------------------------------------------------------------- batching


BATCH_SCHEDULES = SCHEDULES + [{"keep": [5, 5, 3], "clusters": 3}, {"keep": [0.7, 0.7, 0.4], "start_layer": 1,
                                                                        "proportional_attention": True, "clusters": 2}]


@pytest.mark.parametrize("score,aggregate", RULES)
@pytest.mark.parametrize("schedule", BATCH_SCHEDULES, ids=str)
def test_alone_equals_in_a_padded_batch(tiny, score, aggregate, schedule):
    schedule = dict(schedule)
    if aggregate not in ("clusters", "similarity"):
        schedule.pop("clusters", None)
    cfg = cfg_for(score, aggregate, **schedule)
    lengths = [10, 17, 3, 13]
    ids, mask, tt = batch(lengths, seed=7, L=20)                                   # padding: random ids and types
    together = tiny.forward(ids, mask, tt, fca=cfg, trace=True)
    for b, n in enumerate(lengths):
        alone = tiny.forward(ids[b:b + 1, :n], mask[b:b + 1, :n], tt[b:b + 1, :n], fca=cfg, trace=True)
        u = int(alone.mask.sum())
        assert int(together.mask[b].sum()) == u
        want = alone.last_hidden_state[0, :u]          # padding changes the BLAS blocking, not the math
        np.testing.assert_allclose(together.last_hidden_state[b, :u], want, rtol=0, atol=model_bound(want, tiny.config))
        want = alone.logits[0]
        np.testing.assert_allclose(together.logits[b], want, rtol=0, atol=model_bound(want, tiny.config, extra_depth=2))
        np.testing.assert_array_equal(together.sizes[b, :u], alone.sizes[0, :u])
        assert together.flops_per_sequence[b] == alone.flops
        for units, units_alone in zip([L[b] for L in together.trace], [L[0] for L in alone.trace]):
            assert [(u["kind"], u["tokens"]) for u in units] == [(u["kind"], u["tokens"]) for u in units_alone]
            want = [w for u in units_alone for w in u["weights"]]  # softmax weights of scores made by the layers below
            assert_f32_close([w for u in units for w in u["weights"]], want, depth=LAYERS + 1,
                             width=max(tiny.config.hidden_size, tiny.config.intermediate_size), what="merge weights")


# ---------------------------------------------------------------- aggregation rules, directly


@st.composite
def members(draw, max_m=9):
    m = draw(st.integers(1, max_m))
    seed = draw(st.integers(0, 2 ** 16))
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(m, 5)), rng.normal(size=m) * draw(st.sampled_from([0.1, 3.0, 300.0])),
            rng.integers(1, 6, m).astype(np.float64), rng.normal(size=(m, 5)), rng)


@given(members(), st.sampled_from(MERGING), st.integers(1, 4))
def test_coarse_units_are_convex_combinations(data, aggregate, c):
    x, scores, sizes, keys, _ = data
    if aggregate in ("mean", "weighted"):
        c = 1
    groups, w = F.AGGREGATES[aggregate](scores, sizes, keys, c)
    assert groups.min() == 0 and set(groups) == set(range(groups.max() + 1)) and groups.max() + 1 == min(c, len(x))
    assert (w >= 0).all()
    np.testing.assert_allclose(np.bincount(groups, w), 1, atol=1e-12)
    new_x, new_sizes, _W = F.merge(x, sizes, np.zeros(0, np.int64), np.arange(len(x)), groups, w)
    for g in range(groups.max() + 1):
        mem = x[groups == g]
        assert (new_x[g] >= mem.min(0) - 1e-12).all() and (new_x[g] <= mem.max(0) + 1e-12).all()
        assert new_sizes[g] == sizes[groups == g].sum()


@given(members(), st.sampled_from(["mean", "weighted"]))
def test_single_coarse_rules_ignore_member_order(data, aggregate):
    x, scores, sizes, keys, rng = data
    p = rng.permutation(len(x))
    def coarse(i):
        g, w = F.AGGREGATES[aggregate](scores[i], sizes[i], keys[i], 1)
        return F.merge(x[i], sizes[i], np.zeros(0, np.int64), np.arange(len(i)), g, w)[:2]
    (a, sa), (b, sb) = coarse(np.arange(len(x))), coarse(p)
    np.testing.assert_allclose(a, b, atol=1e-12)
    assert sa == sb


def test_weighted_is_softmax_and_mean_is_size_weighted():
    scores, sizes = np.array([1.0, 2.0, 0.0]), np.array([1.0, 3.0, 1.0])
    _, w = F.AGGREGATES["weighted"](scores, sizes, None, 1)
    np.testing.assert_allclose(w, np.exp(scores) / np.exp(scores).sum())
    _, w = F.AGGREGATES["mean"](scores, sizes, None, 1)
    np.testing.assert_allclose(w, [0.2, 0.6, 0.2])
    g, w = F.AGGREGATES["clusters"](np.array([0.0, 0.0, 1.0, 900.0, 0.0]), np.ones(5), None, 2)
    np.testing.assert_array_equal(g, [0, 0, 0, 1, 1])                              # contiguous chunks
    np.testing.assert_allclose(w[:3], np.exp([0, 0, 1]) / np.exp([0, 0, 1]).sum())  # no underflow from group 1
    g, w = F.AGGREGATES["drop"](scores, sizes, None, 1)
    assert (g == -1).all()


def test_select_keeps_cls_and_the_best_in_order():
    np.testing.assert_array_equal(F.select(np.array([-5.0, 1, 3, 2, 3]), 3), [0, 2, 4])
    np.testing.assert_array_equal(F.select(np.array([-5.0, 1, 3, 3, 3]), 3), [0, 2, 3])   # ties: earlier first
    np.testing.assert_array_equal(F.select(np.array([9.0, 1, 2]), 1), [0])


@pytest.mark.parametrize("aggregate", ["weighted", "drop"])
def test_random_rule_is_seeded(tiny, aggregate):
    ids, mask, tt = batch([16, 12], seed=8)
    kept = lambda seed: [[u["tokens"] for u in L[0]] for L in tiny.forward(
        ids, mask, tt, fca=F.FCAConfig(keep=0.5, score="random", aggregate=aggregate, seed=seed), trace=True).trace]
    assert kept(0) == kept(0) and kept(5) == kept(5)
    assert kept(0) != kept(5) or kept(0) != kept(6)


# ---------------------------------------------------------------- configuration and schedules


@pytest.mark.parametrize("bad", [
    {"keep": 0}, {"keep": 1.5}, {"keep": float("nan")}, {"keep": []}, {"keep": [3, 0.5]}, {"keep": [0.5, 0.7]},
    {"keep": [4, 0]}, {"keep": [3, 4]}, {"keep": True}, {"keep": "0.5"}, {"keep": 0.5, "score": "loudest"},
    {"keep": 0.5, "aggregate": "sum"}, {"keep": 0.5, "clusters": 0}, {"keep": 0.5, "clusters": True},
    {"keep": 0.5, "aggregate": "weighted", "clusters": 2}, {"keep": 0.5, "start_layer": -1}, {"keep": 0.5, "start_layer": True},
    {"keep": 0.5, "seed": -1}, {"keep": 0.5, "seed": 1.5}, {"keep": 0.5, "proportional_attention": "yes"}], ids=str)
def test_bad_configs_raise(bad):
    with pytest.raises(ConfigError):
        F.FCAConfig(**bad)


def test_configs_checked_against_the_model(tiny):
    ids, mask, tt = batch([5])
    for cfg in (F.FCAConfig(keep=[0.5, 0.4]), F.FCAConfig(keep=0.5, start_layer=LAYERS)):
        with pytest.raises(ConfigError, match="layers"):
            tiny.forward(ids, mask, tt, fca=cfg)


@given(keep=st.one_of(st.floats(0.05, 1.0), st.lists(st.integers(1, 40), min_size=3, max_size=3).map(
    lambda v: sorted(v, reverse=True)), st.lists(st.floats(0.05, 1.0), min_size=3, max_size=3).map(
    lambda v: sorted(v, reverse=True))),
    score=st.sampled_from(list(F.SCORES)), aggregate=st.sampled_from(list(F.AGGREGATES)),
    proportional=st.booleans(), start=st.integers(0, 2), seed=st.integers(0, 2 ** 31))
def test_schedule_round_trip(tmp_path_factory, keep, score, aggregate, proportional, start, seed):
    cfg = cfg_for(score, aggregate, keep=keep, proportional_attention=proportional, start_layer=start, seed=seed)
    path = tmp_path_factory.mktemp("sched") / "s.json"
    cfg.save(path)
    back = F.FCAConfig.load(path)
    assert back == cfg and type(back.keep) is type(cfg.keep) and back.counts == cfg.counts


def test_schedule_files_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        F.FCAConfig.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{keep: ")
    with pytest.raises(ConfigError, match="bad.json"):
        F.FCAConfig.load(tmp_path / "bad.json")
    (tmp_path / "extra.json").write_text(json.dumps({"keep": 0.5, "speed": "fast"}))
    with pytest.raises(ConfigError, match="speed"):
        F.FCAConfig.load(tmp_path / "extra.json")
    (tmp_path / "list.json").write_text("[0.5]")
    with pytest.raises(ConfigError, match="keep"):
        F.FCAConfig.load(tmp_path / "list.json")
    with pytest.raises(ConfigError, match="not a file"):                # the Python API too, not only the CLI
        F.FCAConfig.load(tmp_path)
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ConfigError, match="not a text file"):
        F.FCAConfig.load(tmp_path / "binary.json")


# ---------------------------------------------------------------- command line


def test_cli_schedule_file(minilm_path, tmp_path, capsys):
    path = tmp_path / "sched.json"
    F.FCAConfig(keep=[0.8, 0.7, 0.6, 0.5, 0.4, 0.3], score="cls_attention", aggregate="mean").save(path)
    assert main(["run", "--model", str(minilm_path), "--fca-schedule", str(path), "--json", "a fine film .",
                 "a dull film that drags on and on ."]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["fca"] == F.FCAConfig.load(path).to_dict()
    assert res["flops"] < res["flops_full"]
    assert main(["run", "--model", str(minilm_path), "--fca-schedule", str(path), "--fca-aggregate", "drop",
                 "--json", "a fine film ."]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["fca"]["aggregate"] == "drop" and res["fca"]["keep"] == [0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    (tmp_path / "bad.json").write_text(json.dumps({"keep": [0.5, 0.9, 0.4, 0.3, 0.2, 0.1]}))
    assert main(["run", "--model", str(minilm_path), "--fca-schedule", str(tmp_path / "bad.json"), "x"]) == 2
    assert "increase" in capsys.readouterr().err


def test_explain_picture(minilm_path, capsys):
    text = "the film is a gorgeous , witty and seductive ride ."
    assert main(["explain", "--model", str(minilm_path), text, "--fca-keep", "0.4"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "after layer" in lines[1] and "[CLS]" in lines[1] and "gorgeous" in lines[1]
    rows = [l for l in lines if l[:1].isdigit()]
    assert len(rows) == 6 and all("fine +" in r or "left alone" in r for r in rows)
    n = len(lines[1].split()) - 3                                                 # tokens in the header row
    assert f"{n} -> {int(np.ceil(0.4 * n - 1e-9)) + 1} " in rows[0]
    assert "c1 (coarse" in out and " + " in out                                   # members with weights
    assert "FLOPs" in out and "Legend" in out
    assert main(["explain", "--model", str(minilm_path), text, "--fca-keep", "0.4", "--json"]) == 0
    pic = json.loads(capsys.readouterr().out)
    first = pic["layers"][0]
    n = len(pic["tokens"])
    assert first["units"] == first["fine"] + first["coarse"] == int(np.ceil(0.4 * n - 1e-9)) + 1
    assert sum(u["size"] for u in first["unit_list"]) == n and first["dropped"] == []
    later = [u for L in pic["layers"][1:] for u in L["unit_list"] if u["kind"] == "fine" and u["size"] > 1]
    if later:                                                                     # a merged unit kept as fine
        assert "fine, merged earlier" in out
    assert main(["explain", "--model", str(minilm_path), text, "--fca-keep", "0.4", "--fca-aggregate", "drop"]) == 0
    out = capsys.readouterr().out
    rows = [l for l in out.splitlines() if l[:1].isdigit()]
    assert all("·" in r for r in rows) and "coarse" not in "".join(rows).replace("+ 0 coarse", "")


def test_demo(minilm_path, capsys):
    assert main(["demo", "--fca-keep", "0.5"]) == 0
    out = capsys.readouterr().out
    for part in ("full", "FCA", "cosine similarity", "FLOPs:", "saved", "time:", "layer by layer", "after layer",
                 "Legend"):
        assert part in out, part
    texts = ["a man plays a guitar on a big stage tonight .", "someone performs music for a crowd ."]
    assert main(["demo", "--json", "--fca-aggregate", "drop", *texts]) == 0
    res = json.loads(capsys.readouterr().out)
    assert 0 < res["flops_ratio"] < 1 and res["time_ratio"] > 0 and res["fca"]["aggregate"] == "drop"
    assert len(res["full"]["similarity"]) == len(res["fca_run"]["similarity"]) == 2
    assert res["picture"]["text"] == res["full"]["embeddings"][0]["text"]
