"""Hostile calls: texts, arrays and settings given to the Python API in every wrong shape and type,
and user FCA rules that break their contract. Each asserts the error class, that minifca raised it,
and that the message names the argument, field or rule (`raised` from test_errors.py).
"""
from __future__ import annotations

import numpy as np
import pytest
from test_errors import raised, write_tiny

import minifca
from minifca import fca as fca_mod
from minifca.errors import CheckpointError, ConfigError, InputError


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return minifca.from_pretrained(write_tiny(tmp_path_factory.mktemp("m") / "tiny"), backend="numpy")


@pytest.fixture(scope="module")
def minilm(minilm_path):
    return minifca.from_pretrained(minilm_path, backend="numpy")


# ---------------------------------------------------------------- texts


@pytest.mark.parametrize("texts, names", [
    (None, ["texts", "NoneType"]),
    (42, ["texts", "int"]),
    (3.5, ["texts", "float"]),
    (b"bytes are not text", ["texts", "bytes"]),
    ({"a": 1}, ["texts", "dict"]),
    (["fine", None], ["texts[1]", "NoneType"]),
    (["fine", 7], ["texts[1]", "int"]),
    ([b"raw"], ["texts[0]", "bytes"]),
    ([["nested", "list"]], ["texts[0]", "list"]),
])
def test_tokenize_bad_texts(minilm, texts, names):
    raised(InputError, minilm.tokenize, texts, match=names)


@pytest.mark.parametrize("pairs, names", [(5, ["pairs", "int"]), ([1], ["pairs[0]", "int"]), ([], ["pairs", "empty"]),
                                          (b"x", ["pairs", "bytes"])])
def test_tokenize_bad_pairs(minilm, pairs, names):
    raised(InputError, minilm.tokenize, ["one text"], pairs, match=names)


@pytest.mark.parametrize("max_length", ["abc", float("nan"), 3.5, 64.0, True, [8]])
def test_max_length_not_an_integer(minilm, max_length):
    raised(InputError, minilm.tokenize, ["a text"], max_length=max_length, match=["max_length", repr(max_length)])


@pytest.mark.parametrize("max_length", [0, -5, 1, 513])
def test_max_length_out_of_range(minilm, max_length):
    raised(InputError, minilm.tokenize, ["a text"], max_length=max_length, match=["max_length", "[2, 512]"])


def test_truncation_not_a_bool(minilm):
    raised(InputError, minilm.tokenize, ["a text"], truncation="yes", match=["truncation", "'yes'"])


@pytest.mark.parametrize("where", ["texts", "pairs"])
def test_lone_surrogate(minilm, where):
    bad = "broken \ud800 text"
    args = (["ok", bad],) if where == "texts" else (["ok", "ok"], ["ok", bad])
    raised(InputError, minilm.tokenize, *args, match=[f"{where}[1]", "surrogate", "'\\ud800'"])


def test_numpy_integer_max_length_works(minilm):
    assert minilm.tokenize(["a b c d e f"], max_length=np.int64(4)).input_ids.shape == (1, 4)


@pytest.mark.parametrize("call, arg, names", [
    ("embed", 7, ["texts", "int"]),
    ("embed", None, ["texts", "NoneType"]),
    ("classify", None, ["texts", "NoneType"]),
    ("classify", [None], ["texts[0]"]),
])
def test_embed_classify_bad_texts(tiny_model, minilm, call, arg, names):
    model = tiny_model if call == "classify" else minilm
    if call == "classify":                                           # the tiny model has no tokenizer: a real one
        model.tokenizer = minilm.tokenizer
    raised(InputError, getattr(model, call), arg, match=names)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, "8", None, True])
@pytest.mark.parametrize("call", ["embed", "classify"])
def test_bad_batch_size(tiny_model, minilm, call, batch_size):
    tiny_model.tokenizer = minilm.tokenizer
    model = minilm if call == "embed" else tiny_model
    raised(InputError, getattr(model, call), ["a", "b"], batch_size=batch_size, match=["batch_size", repr(batch_size)])


def test_classify_pairs_of_other_length(tiny_model, minilm):
    tiny_model.tokenizer = minilm.tokenizer
    raised(InputError, tiny_model.classify, ["a", "b"], pairs=["c"], match="pairs")


# ---------------------------------------------------------------- forward arrays


IDS = [[1, 2, 3], [4, 5, 0]]


@pytest.mark.parametrize("mask, names", [
    ([["1", "1", "1"], ["1", "1", "0"]], ["attention_mask", "dtype <U1"]),
    ([[1, 1, 1], [1, 2, 0]], ["attention_mask", "[1, 1] is 2"]),
    ([[1, 1, 1], [1, -1, 0]], ["attention_mask", "-1"]),
    ([[1, 1, 1], [1, np.nan, 0]], ["attention_mask", "nan"]),
    ([[1, 1, 1], [1, 0.5, 0]], ["attention_mask", "0.5"]),
    ([[None, 1, 1], [1, 1, 0]], ["attention_mask", "object"]),
    ([[1, 1], [1, 1], [1, 0]], ["attention_mask", "(3, 2)", "(2, 3)", "exactly"]),   # the transpose: same size
    ([1, 1, 1, 1, 1, 0], ["attention_mask", "(6,)", "(2, 3)"]),                    # flat: same size
])
def test_bad_attention_mask(tiny_model, mask, names):
    raised(InputError, tiny_model.forward, IDS, mask, match=names)


@pytest.mark.parametrize("tt, names", [
    ([[0, 0, 0], [0, 0.7, 0]], ["token_type_ids", "integers", "float"]),
    ([[0, 0, 0], [0, 1.0, 0]], ["token_type_ids", "integers"]),
    ([["0", "0", "0"], ["0", "0", "0"]], ["token_type_ids", "integers"]),
    ([[0, 0], [0, 0], [0, 0]], ["token_type_ids", "(3, 2)", "exactly"]),
])
def test_bad_token_types(tiny_model, tt, names):
    raised(InputError, tiny_model.forward, IDS, None, tt, match=names)


@pytest.mark.parametrize("ids, names", [
    ([["1", "2"]], ["input_ids", "integers"]),
    ([[1.0, 2.0]], ["input_ids", "integers"]),
    ([[True, False]], ["input_ids", "integers", "bool"]),
    ([[2 ** 70, 1]], ["input_ids", "integers", "object"]),
    (np.ones((1, 2, 3), np.int64), ["input_ids", "(1, 2, 3)"]),
    (5, ["input_ids", "()"]),
    (None, ["input_ids"]),
])
def test_bad_input_ids(tiny_model, ids, names):
    raised(InputError, tiny_model.forward, ids, match=names)


def test_boolean_and_float_masks_of_0_1_are_accepted(tiny_model):
    ref = tiny_model.forward(IDS, [[1, 1, 1], [1, 1, 0]]).logits
    for mask in (np.array([[1, 1, 1], [1, 1, 0]], bool), np.array([[1., 1., 1.], [1., 1., 0.]], np.float32)):
        np.testing.assert_array_equal(tiny_model.forward(IDS, mask).logits, ref)


def test_one_sequence_with_a_one_dimensional_mask(tiny_model):
    np.testing.assert_array_equal(tiny_model.forward([1, 2, 3], [1, 1, 0]).logits,
                                  tiny_model.forward([[1, 2, 3]], [[1, 1, 0]]).logits)


@pytest.mark.parametrize("pad_to", ["abc", -1, 2.5, True, [64]])
def test_bad_pad_to(tiny_model, pad_to):
    raised(InputError, tiny_model.forward, IDS, pad_to=pad_to, match=["pad_to", repr(pad_to)])


def test_fca_not_a_config(tiny_model):
    raised(ConfigError, tiny_model.forward, IDS, fca={"keep": 0.5}, match=["fca", "FCAConfig", "dict"])


# ---------------------------------------------------------------- loading arguments


@pytest.mark.parametrize("name, names", [
    (None, ["folder path or a hub id", "NoneType"]),
    (123, ["int"]),
    ("", ["empty"]),
    ("   ", ["empty"]),
    ("a b", ["'a b'", "not a hub id"]),
    ("-leading/dash", ["not a hub id"]),
    ("user/na--me", ["not a hub id"]),
    ("user/" + "x" * 200, ["not a hub id"]),
    ("a/b/c", ["no such directory"]),
])
def test_bad_checkpoint_name(tmp_path, monkeypatch, name, names):
    monkeypatch.chdir(tmp_path)                                      # "" and "   " must not mean "this folder"
    raised(CheckpointError, minifca.from_pretrained, name, backend="numpy", match=names)


@pytest.mark.parametrize("backend", [["numba"], None, 3])
def test_backend_not_a_string(tmp_path, backend):
    raised(ConfigError, minifca.from_pretrained, tmp_path, backend=backend, match=["backend", repr(backend)])


# ---------------------------------------------------------------- FCA settings


@pytest.mark.parametrize("field, value", [("score", ["attention_received"]), ("score", None),
                                          ("aggregate", ["weighted"]), ("aggregate", {"name": "weighted"}),
                                          ("score", 3)])
def test_rule_name_not_a_string(field, value):
    raised(ConfigError, minifca.FCAConfig, **{field: value}, match=[f"FCA {field}", repr(value)])


@pytest.mark.parametrize("d, names", [({"keep": "0.5"}, ["keep", "'0.5'"]), ({"keep": 0.5, "clusters": 2.0}, ["clusters"]),
                                      ({"keep": 0.5, "seed": -1}, ["seed"]), ({"keep": [0.5, None]}, ["keep"]),
                                      ({"keep": 0.5, "turbo": 1}, ["turbo"]), ({"keep": True}, ["keep"])])
def test_bad_schedule_fields(d, names):
    raised(ConfigError, minifca.FCAConfig.from_dict, d, match=names)


@pytest.mark.parametrize("raw, names", [(b'{"keep": "\xff"}', ["not a text file"]), (b"[" * 100_000, ["JSON"]),
                                        (b"[0.5]", ["JSON object", "keep"])])
def test_bad_schedule_file(tmp_path, raw, names):
    f = tmp_path / "schedule.json"
    f.write_bytes(raw)
    raised(ConfigError, minifca.FCAConfig.load, f, match=[str(f), *names])


@pytest.fixture
def rules():
    """Register throw-away rules; unregister them afterwards."""
    added = []

    def add(kind, name, fn):
        (fca_mod.register_score if kind == "score" else fca_mod.register_aggregate)(name)(fn)
        added.append((kind, name))
        return name
    yield add
    for kind, name in added:
        (fca_mod.SCORES if kind == "score" else fca_mod.AGGREGATES).pop(name)


SEQ = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]


@pytest.mark.parametrize("label, fn, names", [
    ("nan", lambda st, x, k, r: np.full(len(x), np.nan), ["non-finite", "nan"]),
    ("inf", lambda st, x, k, r: np.r_[np.inf, np.zeros(len(x) - 1)], ["non-finite", "inf"]),
    ("scalar", lambda st, x, k, r: 1.0, ["shape ()", "one score per unit"]),
    ("short", lambda st, x, k, r: np.zeros(len(x) - 1), ["shape (9,)", "(10,)"]),
    ("matrix", lambda st, x, k, r: np.zeros((len(x), 2)), ["shape (10, 2)"]),
    ("strings", lambda st, x, k, r: ["a"] * len(x), ["list", "numbers"]),
    ("none", lambda st, x, k, r: None, ["NoneType"]),
])
def test_user_score_rule_breaks_its_contract(tiny_model, rules, label, fn, names):
    name = rules("score", f"bad_{label}", fn)
    raised(ConfigError, tiny_model.forward, SEQ, fca=minifca.FCAConfig(keep=0.5, score=name),
           match=[f"FCA score rule {name!r}", *names])


def _agg(groups, weights):
    return lambda s, sizes, keys, c: (groups(len(s)), weights(len(s)))


@pytest.mark.parametrize("label, fn, names", [
    ("group 5000", _agg(lambda m: np.full(m, 5000), lambda m: np.ones(m) / m), ["groups", "5000", "G <= 5"]),
    ("group 10**6", _agg(lambda m: np.r_[0, np.full(m - 1, 10 ** 6)], lambda m: np.ones(m)), ["groups", "1000000"]),
    ("group -2", _agg(lambda m: np.full(m, -2), lambda m: np.ones(m) / m), ["groups", "-2"]),
    ("a gap in groups", _agg(lambda m: np.r_[0, np.full(m - 1, 2)], lambda m: np.ones(m)), ["every one of them used"]),
    ("float groups", _agg(lambda m: np.full(m, 0.5), lambda m: np.ones(m) / m), ["groups of dtype float64"]),
    ("short groups", _agg(lambda m: np.zeros(m - 1, int), lambda m: np.ones(m) / m), ["groups of shape (4,)", "(5,)"]),
    ("weights sum to 2", _agg(lambda m: np.zeros(m, int), lambda m: np.full(m, 2.0 / m)), ["sum to 2", "not 1"]),
    ("negative weight", _agg(lambda m: np.zeros(m, int), lambda m: np.r_[-1.0, np.full(m - 1, 2.0 / (m - 1))]),
     [">= 0"]),
    ("nan weight", _agg(lambda m: np.zeros(m, int), lambda m: np.full(m, np.nan)), ["finite"]),
    ("one array", lambda s, sizes, keys, c: np.zeros(len(s), int), ["expected (groups, weights)"]),
    ("none", lambda s, sizes, keys, c: None, ["expected (groups, weights)"]),
])
def test_user_aggregate_rule_breaks_its_contract(tiny_model, rules, label, fn, names):
    name = rules("aggregate", f"bad_{label.replace(' ', '_')}", fn)
    raised(ConfigError, tiny_model.forward, SEQ, fca=minifca.FCAConfig(keep=0.5, aggregate=name),
           match=[f"FCA aggregate rule {name!r}", *names])


def test_user_rules_within_the_contract_run(tiny_model, rules):
    """float32 weights off by their rounding, integer groups given as floats: within the contract, they run."""
    name = rules("aggregate", "ok_f32", lambda s, sizes, keys, c: (np.zeros(len(s)),
                                                                   (np.ones(len(s)) / len(s)).astype(np.float32)))
    out = tiny_model.forward(SEQ, fca=minifca.FCAConfig(keep=0.5, aggregate=name))
    assert out.mask.sum() == 6                                       # 5 fine + 1 coarse
