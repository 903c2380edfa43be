"""Hostile checkpoints: safetensors headers, shard indexes, non-finite weights, incomplete or foreign heads,
config.json and tokenizer files that are wrong in ways a careless writer (or an attacker) produces.

Each case asserts the error class, that it is raised by minifca itself, and that the message names the
file and the tensor or field at fault (`raised` from test_errors.py).
"""
from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import safetensors.numpy as stn
from test_errors import CFG, Q0, load, raised, tiny_state, write_tiny

import minifca
from minifca.errors import CheckpointError, ConfigError, TokenizerError

from conftest import ROOT, model_bound, torch_reference, write_random_checkpoint

K0 = "encoder.layer.0.attention.self.key.weight"


@pytest.fixture
def tiny(tmp_path):
    return write_tiny(tmp_path / "tiny")


def header_of(f):
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_header(f, header, body, raw=None):
    """A safetensors file with this header (JSON, or `raw` bytes) and body, the header padded to 8 bytes."""
    h = raw if raw is not None else json.dumps(header, separators=(",", ":")).encode()
    h = h + b" " * (-len(h) % 8)
    f.write_bytes(struct.pack("<Q", len(h)) + h + body)


def mutate(f, fn):
    header, body = header_of(f)
    fn(header)
    write_header(f, header, body)


# ---------------------------------------------------------------- safetensors header entries

def _set(name, key, value):
    def fn(h):
        h[name][key] = value
    return fn


@pytest.mark.parametrize("label, fn, names", [
    ("negative shape", _set(Q0, "shape", [-1, -16]), ["shape", "non-negative"]),
    ("2^32 x 2^32 shape", _set(Q0, "shape", [2 ** 32, 2 ** 32]), ["shape [4294967296, 4294967296]", "needs"]),
    ("2^64 shape", _set(Q0, "shape", [2 ** 64]), ["needs 73786976294838206464"]),
    ("float dimension", _set(Q0, "shape", [16.5, 16]), ["shape", "[16.5, 16]"]),
    ("bool dimension", _set(Q0, "shape", [True, 16]), ["shape"]),
    ("string shape", _set(Q0, "shape", "16,16"), ["shape", "'16,16'"]),
    ("shape missing", lambda h: h[Q0].pop("shape"), ["shape", "None"]),
    ("offsets 1e400", _set(Q0, "data_offsets", [0, 1e400]), ["data_offsets", "inf"]),
    ("offsets floats", _set(Q0, "data_offsets", [0.0, 1024.0]), ["data_offsets"]),
    ("three offsets", _set(Q0, "data_offsets", [0, 512, 1024]), ["data_offsets"]),
    ("negative start", _set(Q0, "data_offsets", [-1024, 0]), ["overlaps"]),
    ("end past the file", _set(Q0, "data_offsets", [0, 10 ** 12]), ["outside the file", "truncated or garbled"]),
    ("unknown dtype", _set(Q0, "dtype", "F13"), ["dtype 'F13'", "F32"]),
    ("dtype not a string", _set(Q0, "dtype", ["F32"]), ["dtype ['F32']"]),
    ("entry a list", lambda h: h.__setitem__(Q0, [1, 2]), ["garbled header entry", "not an object"]),
    ("entry null", lambda h: h.__setitem__(Q0, None), ["garbled header entry"]),
])
def test_bad_header_entry(tiny, label, fn, names):
    f = tiny / "model.safetensors"
    mutate(f, fn)
    raised(CheckpointError, load, tiny, match=[str(f), Q0, *names])


def test_overlapping_offsets(tiny):
    """Two tensors claiming the same bytes: refused (safetensors tensors tile the data section)."""
    f = tiny / "model.safetensors"
    header, body = header_of(f)
    header[Q0]["data_offsets"] = list(header[K0]["data_offsets"])   # the key's bytes, claimed twice
    write_header(f, header, body)
    raised(CheckpointError, load, tiny, match=[str(f), Q0, "overlaps", "without gaps or overlaps"])


def test_gap_between_tensors(tiny):
    f = tiny / "model.safetensors"
    header, body = header_of(f)
    last = max(header.values(), key=lambda e: e["data_offsets"][1] if isinstance(e, dict) and "data_offsets" in e
               else -1)
    start, end = last["data_offsets"]
    last["data_offsets"] = [start + 4, end + 4]                     # 4 unclaimed bytes before it
    write_header(f, header, body + b"\0" * 4)
    raised(CheckpointError, load, tiny, match=[str(f), "gap"])


def test_bytes_appended_after_the_tensors(tiny):
    f = tiny / "model.safetensors"
    f.write_bytes(f.read_bytes() + b"#!/bin/sh\n")                  # a polyglot file
    raised(CheckpointError, load, tiny, match=[str(f), "10 bytes after the last tensor"])


def test_header_not_an_object(tiny):
    f = tiny / "model.safetensors"
    _, body = header_of(f)
    write_header(f, None, body, raw=b"[1, 2, 3]")
    raised(CheckpointError, load, tiny, match=[str(f), "not a JSON object"])


def test_header_key_twice(tiny):
    f = tiny / "model.safetensors"
    header, body = header_of(f)
    raw = json.dumps(header, separators=(",", ":")).encode()
    entry = json.dumps({Q0: header[Q0]}, separators=(",", ":")).encode()[1:-1]
    write_header(f, None, body, raw=raw[:-1] + b"," + entry + b"}")
    raised(CheckpointError, load, tiny, match=[str(f), Q0, "twice"])


def test_header_nested_deeper_than_json_can_parse(tiny):
    f = tiny / "model.safetensors"
    _, body = header_of(f)
    write_header(f, None, body, raw=b"[" * 100_000 + b"]" * 100_000)
    raised(CheckpointError, load, tiny, match=[str(f), "garbled", "RecursionError"])


def test_header_not_utf8(tiny):
    f = tiny / "model.safetensors"
    _, body = header_of(f)
    write_header(f, None, body, raw=b'{"\xff\xfe": 1}')
    raised(CheckpointError, load, tiny, match=[str(f), "garbled", "UnicodeDecodeError"])


def test_metadata_is_ignored(tiny):
    """__metadata__ is not a tensor (and may hold anything the writer liked)."""
    before = load(tiny).forward([[1, 2, 3]]).logits
    mutate(tiny / "model.safetensors", lambda h: h.__setitem__("__metadata__", {"format": "pt"}))
    np.testing.assert_array_equal(load(tiny).forward([[1, 2, 3]]).logits, before)


def test_unaligned_data_section_loads_the_same(tiny):
    """A header whose length is not a multiple of 4 leaves float32 data unaligned: still loads, same output."""
    f = tiny / "model.safetensors"
    before = load(tiny).forward([[1, 2, 3]]).logits
    header, body = header_of(f)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((-len(h) % 8) + 1)                                 # 1 mod 8
    f.write_bytes(struct.pack("<Q", len(h)) + h + body)
    model = minifca.from_pretrained(tiny, backend="numba")
    np.testing.assert_allclose(model.forward([[1, 2, 3]]).logits, before, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- non-finite weights


@pytest.mark.parametrize("name, index, value", [
    (Q0, (0, 0), np.nan),
    ("embeddings.word_embeddings.weight", (7, 3), np.inf),
    ("embeddings.LayerNorm.weight", (5,), -np.inf),
    ("pooler.dense.weight", (1, 2), np.inf),
    ("classifier.weight", (1, 15), np.nan),
    ("classifier.bias", (0,), np.nan),
    ("encoder.layer.1.output.LayerNorm.bias", (15,), np.nan),
])
def test_non_finite_weight(tmp_path, name, index, value):
    state = tiny_state()
    state[name][index] = value
    folder = write_tiny(tmp_path / "m", state)
    raised(CheckpointError, load, folder, match=[str(folder / "model.safetensors"), name, "non-finite",
                                                 f"at {list(index)}"])


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_non_finite_after_conversion(tmp_path, dtype):
    """fp16 inf, or an fp64 value too large for float32 (inf once converted): both refused, naming the tensor."""
    state = {k: v.astype(dtype) for k, v in tiny_state().items()}
    state[Q0][3, 4] = np.inf if dtype == np.float16 else 1e300
    folder = write_tiny(tmp_path / "m", state)
    raised(CheckpointError, load, folder, match=[Q0, "non-finite", "[3, 4]"])


def test_non_finite_bfloat16(tmp_path):
    state = tiny_state()
    bf = {k: (v.view(np.uint32) >> 16).astype(np.uint16) for k, v in state.items()}
    bf[Q0][2, 2] = 0x7FC0                                           # bfloat16 NaN
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CFG))
    f = folder / "model.safetensors"
    stn.save_file(bf, str(f))
    mutate(f, lambda h: [e.__setitem__("dtype", "BF16") for k, e in h.items() if k != "__metadata__"])
    raised(CheckpointError, load, folder, match=[Q0, "non-finite", "[2, 2]"])


# ---------------------------------------------------------------- sharded checkpoints

def _sharded(folder, weight_map=None, raw=None):
    from test_errors import _shard
    _shard(folder)
    index = folder / "model.safetensors.index.json"
    if raw is not None:
        index.write_bytes(raw)
    elif weight_map is not None:
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


@pytest.mark.parametrize("weight_map, names", [
    ({}, ["weight_map", "non-empty"]),
    ([["a", "b"]], ["weight_map", "non-empty", "list"]),
    ({Q0: 3}, ["weight_map", Q0, "3", "not a shard file name"]),
    ({Q0: None}, [Q0, "None"]),
    ({Q0: ""}, [Q0, "not a shard file name"]),
    ({Q0: ["model-00001-of-00002.safetensors"]}, [Q0]),
    ({Q0: "../model-00001-of-00002.safetensors"}, ["outside the checkpoint's folder", "'../model-00001"]),
    ({Q0: "sub/../../x.safetensors"}, ["outside", "sub/../../x.safetensors"]),
    ({Q0: "/etc/passwd"}, ["outside", "/etc/passwd"]),
    ({Q0: "C:\\\\weights\\\\x.safetensors"}, ["outside"]),
    ({Q0: "..\\\\x.safetensors"}, ["outside"]),
])
def test_bad_weight_map(tiny, weight_map, names):
    index = _sharded(tiny, weight_map)
    raised(CheckpointError, load, tiny, match=[str(index), *names])


@pytest.mark.parametrize("raw, names", [
    (b'{"weight_map": {"a": "\xff.safetensors"}}', ["UTF-8", "UnicodeDecodeError"]),
    (b"[1, 2]", ["weight_map", "non-empty"]),
    (b'{"weight_map": {"a": "x"}, "weight_map": {"b": "y"}}', ["weight_map", "twice"]),
    (b"\x00\x01", ["malformed"]),
])
def test_bad_index_file(tiny, raw, names):
    index = _sharded(tiny, raw=raw)
    raised(CheckpointError, load, tiny, match=[str(index), *names])


def test_shard_that_is_a_folder(tiny):
    index = _sharded(tiny)
    d = json.loads(index.read_text())
    d["weight_map"][Q0] = "subdir"
    (tiny / "subdir").mkdir()
    index.write_text(json.dumps(d))
    raised(CheckpointError, load, tiny, match=[str(index), "missing", "subdir"])


# ---------------------------------------------------------------- heads


def _without(*names):
    return {k: v for k, v in tiny_state().items() if k not in names}


@pytest.mark.parametrize("drop, missing", [
    (("pooler.dense.weight", "pooler.dense.bias"), "pooler.dense.weight"),     # classifier on no pooler
    (("pooler.dense.bias",), "pooler.dense.bias"),
    (("classifier.bias",), "classifier.bias"),
    (("classifier.weight",), "classifier.weight"),
])
def test_incomplete_classifier_or_pooler(tmp_path, drop, missing):
    folder = write_tiny(tmp_path / "m", _without(*drop))
    raised(CheckpointError, load, folder, match=[str(folder), missing, "missing"])


def _mlm_state(drop=()):
    rng = np.random.default_rng(1)
    state = _without("classifier.weight", "classifier.bias")
    for n, s in {"cls.predictions.transform.dense.weight": (16, 16), "cls.predictions.transform.dense.bias": (16,),
                 "cls.predictions.transform.LayerNorm.weight": (16,), "cls.predictions.transform.LayerNorm.bias": (16,),
                 "cls.predictions.bias": (50,)}.items():
        state[n] = (rng.standard_normal(s) * 0.1).astype(np.float32)
    return {k: v for k, v in state.items() if k not in drop}


@pytest.mark.parametrize("drop", ["cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias",
                                  "cls.predictions.transform.dense.bias", "cls.predictions.bias"])
def test_incomplete_masked_lm_head(tmp_path, drop):
    folder = write_tiny(tmp_path / "m", _mlm_state(drop=(drop,)))
    raised(CheckpointError, load, folder, match=[str(folder), "masked-LM head", drop])


def test_pooler_and_masked_lm_head_give_logits(tmp_path):
    """BertForPreTraining's layout (pooler + MLM head): the MLM logits are there (they used to be dropped)."""
    out = load(write_tiny(tmp_path / "m", _mlm_state())).forward([[1, 2, 3, 4]])
    assert out.logits.shape == (1, 4, 50) and out.pooler_output.shape == (1, 16)


def test_masked_lm_with_fca_says_why_there_are_no_logits(tmp_path):
    model = load(write_tiny(tmp_path / "m", _mlm_state()))
    out = model.forward([[1, 2, 3, 4, 5, 6]], fca=minifca.FCAConfig(keep=0.5))
    assert out.logits is None
    assert "FCA" in out.why_no_logits and "masked-LM" in out.why_no_logits
    assert model.forward([[1, 2, 3]]).why_no_logits is None


@pytest.mark.parametrize("arch", ["BertForQuestionAnswering", "BertForMultipleChoice", "BertForNextSentencePrediction"])
def test_unsupported_architecture_refused_by_name(tmp_path, arch):
    folder = write_tiny(tmp_path / "m", cfg={**CFG, "architectures": [arch]})
    raised(CheckpointError, load, folder, match=[str(folder), arch, "architectures"])


@pytest.fixture(scope="module")
def token_ckpt(tmp_path_factory):
    shape = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 40, "vocab_size": 90,
                 "max_position_embeddings": 24, "num_labels": 5}
    return write_random_checkpoint(tmp_path_factory.mktemp("tok") / "m", head="token", **shape)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_token_classification_matches_transformers(token_ckpt, backend):
    import torch
    model = minifca.from_pretrained(token_ckpt, backend=backend)
    ids = np.array([[2, 17, 33, 45, 3, 0], [2, 8, 9, 3, 0, 0]])
    mask = (ids > 0).astype(np.int64)
    out = model.forward(ids, mask)
    with torch.no_grad():
        ref = torch_reference(token_ckpt, head="token")(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    assert out.logits.shape == (2, 6, 5)
    valid = mask > 0                                                 # padding positions' logits are not compared
    model_bound_ = model_bound(ref[valid], model.config, extra_depth=1)  # the 2 layers, embeddings, + the head
    assert np.abs(out.logits - ref)[valid].max() <= model_bound_
    assert out.flops > model.forward(ids[:, :1]).flops                # the head's work counts per token


def test_token_classification_refuses_fca_and_classify(token_ckpt):
    model = minifca.from_pretrained(token_ckpt, backend="numpy")
    raised(ConfigError, model.forward, [[2, 17, 33, 45, 3]], fca=minifca.FCAConfig(keep=0.5),
           match=["BertForTokenClassification", "FCA merges tokens"])
    with pytest.raises(CheckpointError, match="classifies tokens"):
        model.classify(["a text"])


# ---------------------------------------------------------------- config.json


@pytest.mark.parametrize("field, value, names", [
    ("architectures", "BertModel", ["architectures", "list"]),
    ("architectures", [1], ["architectures"]),
    ("id2label", {"0": "neg", "1": 7}, ["id2label", "strings"]),
    ("id2label", {"0": "neg", "1.5": "pos"}, ["id2label", "integers"]),
    ("hidden_size", True, ["hidden_size"]),
    ("num_labels", 2.0, ["num_labels"]),
    ("hidden_act", ["gelu"], ["hidden_act"]),
    ("type_vocab_size", None, ["type_vocab_size"]),
])
def test_config_field(tiny, field, value, names):
    (tiny / "config.json").write_text(json.dumps({**CFG, field: value}))
    raised(ConfigError, load, tiny, match=[str(tiny / "config.json"), *names])


@pytest.mark.parametrize("text, field", [('{"layer_norm_eps": NaN}', "layer_norm_eps"),
                                         ('{"layer_norm_eps": Infinity}', "layer_norm_eps"),
                                         ('{"hidden_size": NaN}', "hidden_size")])
def test_config_non_finite_numbers(tiny, text, field):
    d = {**CFG, **json.loads(text)}
    (tiny / "config.json").write_text(json.dumps(d))                 # json writes NaN/Infinity as Python reads them
    raised(ConfigError, load, tiny, match=[str(tiny / "config.json"), field])


@pytest.mark.parametrize("raw, names", [(b'{"hidden_size": "\xff"}', ["UTF-8", "UnicodeDecodeError"]),
                                        (b"[" * 100_000, ["RecursionError"])])
def test_config_not_utf8_or_too_deep(tiny, raw, names):
    (tiny / "config.json").write_bytes(raw)
    raised(ConfigError, load, tiny, match=[str(tiny / "config.json"), *names])


def test_config_json_is_a_folder(tmp_path):
    folder = tmp_path / "m"
    write_tiny(folder)
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    raised(ConfigError, load, folder, match=[str(folder / "config.json"), "not found"])


# ---------------------------------------------------------------- tokenizer files


def _vocab(folder):
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\nb")


@pytest.mark.parametrize("raw, names", [
    (b"[1, 2]", ["JSON object", "list"]),
    (b'{"do_lower_case": "\xff"}', ["UTF-8"]),
    (b'{"do_lower_case": "yes"}', ["do_lower_case", "'yes'"]),
    (b"[" * 100_000, ["RecursionError"]),
])
def test_bad_tokenizer_config(tiny, raw, names):
    _vocab(tiny)
    (tiny / "tokenizer_config.json").write_bytes(raw)
    raised(TokenizerError, load, tiny, match=[str(tiny / "tokenizer_config.json"), *names])


@pytest.mark.parametrize("raw", [b"\xff\xfe\x00garbage", b"[]", b'{"model": {"type": "WordPiece", "vocab": 5}}'])
def test_bad_tokenizer_json(tiny, raw):
    (tiny / "tokenizer.json").write_bytes(raw)
    raised(TokenizerError, load, tiny, match=str(tiny / "tokenizer.json"))


# ---------------------------------------------------------------- memory mapping


def test_mmap_false_reads_into_memory_and_survives_truncation(tiny):
    f = tiny / "model.safetensors"
    mapped = load(tiny).forward([[1, 2, 3]]).logits
    model = minifca.from_pretrained(tiny, backend="numpy", mmap=False)
    w = model.params["layers"][0]["attn"]["q"]["w"]
    assert not isinstance(w.base, np.memmap) and not w.flags.writeable
    f.write_bytes(f.read_bytes()[:64])                              # truncated while the model is alive
    np.testing.assert_array_equal(model.forward([[1, 2, 3]]).logits, mapped)


def test_mmap_must_be_a_bool(tiny):
    raised(ConfigError, minifca.from_pretrained, tiny, mmap="no", match=["mmap", "'no'"])


def test_truncated_while_memory_mapped_is_sigbus(tiny):
    """The documented hazard of mmap=True (README, loading notes): the OS kills the process with SIGBUS."""
    code = textwrap.dedent(f"""
        import minifca, pathlib
        m = minifca.from_pretrained({str(tiny)!r}, backend="numpy")
        f = pathlib.Path({str(tiny / 'model.safetensors')!r})
        f.write_bytes(f.read_bytes()[:64])
        m.forward([[1, 2, 3]])
        print("survived")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert r.returncode == -signal.SIGBUS, (r.returncode, r.stderr[-500:])
    assert "survived" not in r.stdout
