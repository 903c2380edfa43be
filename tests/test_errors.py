"""The catalog of bad inputs: each raises the documented minifca.errors type, raised by minifca itself
(not a traceback from deep inside NumPy, json or safetensors), with a message naming the file, tensor or field.

    case                                         exception          the message names
    missing directory / path is a file           CheckpointError    the path
    missing config.json                          ConfigError        config.json
    malformed or contradictory config.json       ConfigError        the file and the field
    no weights / pickle-only weights             CheckpointError    the folder (+ how to convert)
    truncated / garbled safetensors, bad index   CheckpointError    the file (and tensor)
    missing / unexpected / misshaped tensor      CheckpointError    the tensor
    unreadable tokenizer files                   TokenizerError     the file
    too long, empty, ids outside the vocab, ...  InputError         the limit / the id / the field
    non-finite weights                           CheckpointError    the tensor (checked at load)
    unknown backend                              ConfigError        the backend
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as stn

import minifca
from minifca.config import BertConfig
from minifca.errors import CheckpointError, ConfigError, InputError, MinifcaError, TokenizerError
from minifca.weights import expected_shapes

CFG = {"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 24,
           "max_position_embeddings": 12, "type_vocab_size": 2, "hidden_act": "gelu", "model_type": "bert"}
Q0 = "encoder.layer.0.attention.self.query.weight"


def tiny_state(seed=0):
    rng = np.random.default_rng(seed)
    shapes = expected_shapes(BertConfig.from_dict(CFG))
    state = {n: (rng.standard_normal(s) * 0.1).astype(np.float32) for n, s in shapes.items()}
    state["pooler.dense.weight"] = (rng.standard_normal((16, 16)) * 0.1).astype(np.float32)
    state["pooler.dense.bias"] = np.zeros(16, np.float32)
    state["classifier.weight"] = (rng.standard_normal((2, 16)) * 0.1).astype(np.float32)
    state["classifier.bias"] = np.zeros(2, np.float32)
    return state


def write_tiny(folder: Path, state=None, cfg=None) -> Path:
    """A tiny valid checkpoint (no torch needed): config.json + model.safetensors, BertModel names."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg or CFG))
    stn.save_file(tiny_state() if state is None else state, str(folder / "model.safetensors"))
    return folder


@pytest.fixture
def tiny(tmp_path):
    return write_tiny(tmp_path / "tiny")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return minifca.from_pretrained(write_tiny(tmp_path_factory.mktemp("m") / "tiny"), backend="numpy")


def raised(exc_type, fn, *args, match=None, **kw):
    """Call fn, assert it raises exactly `exc_type` (a MinifcaError), from minifca's own code; return the text."""
    with pytest.raises(MinifcaError) as info:
        fn(*args, **kw)
    assert type(info.value) is exc_type, f"{type(info.value).__name__}: {info.value}"
    last = info.traceback[-1].path
    assert "/minifca/" in str(last), f"raised from {last}, not by minifca"
    msg = str(info.value)
    assert "\n" not in msg.split("Convert once")[0], "one-line message (before any how-to)"
    for m in [match] if isinstance(match, str) else (match or []):
        assert m in msg, f"{m!r} not in {msg!r}"
    return msg


def load(path):
    return minifca.from_pretrained(path, backend="numpy")


def test_the_tiny_checkpoint_is_valid(tiny):
    out = load(tiny).forward([[1, 2, 3]])
    assert out.logits.shape == (1, 2)


# ---------------------------------------------------------------- folders and files


def test_missing_directory(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    raised(CheckpointError, load, missing, match=str(missing))


@pytest.mark.parametrize("offline", ["1", "0"])
def test_missing_relative_directory(tmp_path, monkeypatch, offline):
    """A name that is no folder here is tried as a hub id; when that fails too: one line naming it."""
    from huggingface_hub import constants
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline == "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")     # a fake hub: connection refused
    raised(CheckpointError, load, "my_model_dir_that_is_not_here", match=["my_model_dir_that_is_not_here", "hub"])


def test_path_is_a_file(tiny):
    raised(CheckpointError, load, tiny / "config.json", match=["config.json", "folder"])


def test_missing_config_json(tiny):
    (tiny / "config.json").unlink()
    raised(ConfigError, load, tiny, match=str(tiny / "config.json"))


def test_missing_model_safetensors(tiny):
    (tiny / "model.safetensors").unlink()
    raised(CheckpointError, load, tiny, match=[str(tiny), "model.safetensors"])


def test_pickle_only_checkpoint_says_how_to_convert(tiny):
    (tiny / "model.safetensors").unlink()
    (tiny / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    msg = raised(CheckpointError, load, tiny, match=["pytorch_model.bin", "never unpickles", "safetensors"])
    assert "save_file" in msg or "save_pretrained" in msg           # the conversion command


def test_pt_file_only(tiny):
    (tiny / "model.safetensors").unlink()
    (tiny / "weights.pt").write_bytes(b"junk")
    raised(CheckpointError, load, tiny, match="weights.pt")


# ---------------------------------------------------------------- config.json


def test_malformed_json(tiny):
    (tiny / "config.json").write_text('{"hidden_size": 16,, }')
    raised(ConfigError, load, tiny, match=[str(tiny / "config.json"), "not valid JSON"])


def test_config_not_an_object(tiny):
    (tiny / "config.json").write_text("[1, 2, 3]")
    raised(ConfigError, load, tiny, match=["config.json", "JSON object"])


@pytest.mark.parametrize("field, value, names", [
    ("num_attention_heads", 3, ["hidden_size", "num_attention_heads"]),      # 16 % 3 != 0
    ("hidden_size", -16, ["hidden_size"]),
    ("num_hidden_layers", 0, ["num_hidden_layers"]),
    ("intermediate_size", "big", ["intermediate_size"]),
    ("vocab_size", 2.5, ["vocab_size"]),
    ("max_position_embeddings", -1, ["max_position_embeddings"]),
    ("hidden_act", "gelu_fancy", ["hidden_act", "gelu_fancy"]),
    ("layer_norm_eps", -1e-12, ["layer_norm_eps"]),
    ("pad_token_id", 50, ["pad_token_id"]),
    ("model_type", "roberta", ["model_type"]),
    ("position_embedding_type", "relative_key", ["position_embedding_type"]),
    ("num_labels", 0, ["num_labels"]),
])
def test_contradictory_config(tiny, field, value, names):
    (tiny / "config.json").write_text(json.dumps({**CFG, field: value}))
    raised(ConfigError, load, tiny, match=[str(tiny / "config.json"), *names])


def test_num_labels_contradicts_id2label(tiny):
    (tiny / "config.json").write_text(json.dumps({**CFG, "num_labels": 3, "id2label": {"0": "a", "1": "b"}}))
    raised(ConfigError, load, tiny, match=["num_labels", "id2label"])


# ---------------------------------------------------------------- safetensors files


def test_truncated_safetensors(tiny):
    f = tiny / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])                          # header intact, tensors cut off
    raised(CheckpointError, load, tiny, match=[str(f), "truncated"])


@pytest.mark.parametrize("keep", [0, 5, 20])
def test_truncated_inside_the_header(tiny, keep):
    f = tiny / "model.safetensors"
    f.write_bytes(f.read_bytes()[:keep])
    raised(CheckpointError, load, tiny, match=[str(f), "truncated"])


def test_garbled_header(tiny):
    f = tiny / "model.safetensors"
    data = bytearray(f.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    data[8:8 + n] = b"\xff{garbage" + b" " * (n - 9)                # same length, not JSON
    f.write_bytes(bytes(data))
    raised(CheckpointError, load, tiny, match=[str(f), "garbled"])


def test_garbled_header_entry(tiny):
    """A header that is JSON but names a dtype safetensors does not have."""
    f = tiny / "model.safetensors"
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header[Q0]["dtype"] = "F13"
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    new = new.ljust(n)                                              # safetensors pads headers with spaces
    f.write_bytes(data[:8] + new + data[8 + n:])
    raised(CheckpointError, load, tiny, match=[str(f), Q0])


def test_missing_tensor(tmp_path):
    state = tiny_state()
    del state[Q0]
    folder = write_tiny(tmp_path / "m", state)
    raised(CheckpointError, load, folder, match=["missing", Q0])


def test_unexpected_tensor(tmp_path):
    state = tiny_state()
    state["encoder.layer.7.attention.self.query.weight"] = np.zeros((16, 16), np.float32)   # only 2 layers
    folder = write_tiny(tmp_path / "m", state)
    raised(CheckpointError, load, folder, match=["unexpected", "encoder.layer.7.attention.self.query.weight"])


def test_wrongly_shaped_tensor(tmp_path):
    state = tiny_state()
    state[Q0] = np.zeros((16, 8), np.float32)
    folder = write_tiny(tmp_path / "m", state)
    raised(CheckpointError, load, folder, match=[Q0, "(16, 8)", "(16, 16)"])


def test_wrongly_shaped_head_tensor(tmp_path):
    state = tiny_state()
    state["classifier.weight"] = np.zeros((3, 16), np.float32)      # config says num_labels 2
    folder = write_tiny(tmp_path / "m", state)
    raised(CheckpointError, load, folder, match=["classifier.weight", "(3, 16)"])


def test_integer_weight_tensor(tmp_path):
    state = tiny_state()
    state[Q0] = np.zeros((16, 16), np.int32)
    folder = write_tiny(tmp_path / "m", state)
    raised(CheckpointError, load, folder, match=[Q0, "dtype"])


def _shard(folder: Path):
    """Split the tiny checkpoint into two shards with an index."""
    state = stn.load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, ns in parts.items():
        stn.save_file({n: state[n] for n in ns}, str(folder / fname))
    index = {"metadata": {}, "weight_map": {n: f for f, ns in parts.items() for n in ns}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_sharded_tiny_loads(tiny):
    a = load(tiny).forward([[1, 2, 3]]).logits
    b = load(_shard(tiny)).forward([[1, 2, 3]]).logits
    np.testing.assert_array_equal(a, b)


def test_missing_shard(tiny):
    _shard(tiny)
    (tiny / "model-00002-of-00002.safetensors").unlink()
    raised(CheckpointError, load, tiny, match=["model.safetensors.index.json", "model-00002-of-00002.safetensors"])


def test_malformed_shard_index(tiny):
    _shard(tiny)
    (tiny / "model.safetensors.index.json").write_text('{"metadata": {}}')
    raised(CheckpointError, load, tiny, match=["model.safetensors.index.json", "weight_map"])


def test_tensor_in_two_shards(tiny):
    _shard(tiny)
    first = stn.load_file(str(tiny / "model-00001-of-00002.safetensors"))
    second = stn.load_file(str(tiny / "model-00002-of-00002.safetensors"))
    name = min(first)
    second[name] = first[name]                              # the same tensor written into both shards
    stn.save_file(second, str(tiny / "model-00002-of-00002.safetensors"))
    raised(CheckpointError, load, tiny, match=[name, "model-00001-of-00002.safetensors",
                                                "model-00002-of-00002.safetensors"])


# ---------------------------------------------------------------- tokenizer files


def test_garbled_tokenizer_json(tiny):
    (tiny / "tokenizer.json").write_text('{"version": "1.0", "model": 42}')
    raised(TokenizerError, load, tiny, match=str(tiny / "tokenizer.json"))


def test_malformed_tokenizer_config(tiny):
    (tiny / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\nb")
    (tiny / "tokenizer_config.json").write_text("{oops")
    raised(TokenizerError, load, tiny, match=str(tiny / "tokenizer_config.json"))


# ---------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def minilm(minilm_path):
    return minifca.from_pretrained(minilm_path, backend="numpy")


def test_input_longer_than_max_positions(minilm):
    long = "word " * 600
    raised(InputError, minilm.tokenize, [long], match=["512", "truncat"])
    enc = minilm.tokenize([long], truncation=True)                  # asked for: cut to the limit, and it runs
    assert enc.input_ids.shape == (1, 512)
    assert minilm(enc).last_hidden_state.shape == (1, 512, 384)
    assert minilm.tokenize([long], max_length=64).input_ids.shape == (1, 64)


def test_raw_ids_longer_than_max_positions(tiny_model):
    raised(InputError, tiny_model.forward, np.ones((1, 13), np.int64), match=["13", "max_position_embeddings"])


def test_max_length_out_of_range(minilm):
    raised(InputError, minilm.tokenize, ["a"], max_length=1000, match=["max_length", "512"])


@pytest.mark.parametrize("call", ["tokenize", "embed"])
def test_empty_input_list(minilm, call):
    raised(InputError, getattr(minilm, call), [], match="empty")


def test_empty_classify(tiny_model):
    raised(InputError, tiny_model.classify, [], match="empty")


def test_empty_raw_ids(tiny_model):
    raised(InputError, tiny_model.forward, np.zeros((0, 3), np.int64), match="input_ids")


@pytest.mark.parametrize("bad", [50, 10_000, -1])
def test_token_ids_outside_vocabulary(tiny_model, bad):
    ids = np.array([[1, 2, bad, 3]])
    raised(InputError, tiny_model.forward, ids, match=[str(bad), "[0, 2]", "vocabulary", "[0, 50)"])


def test_ragged_ids(tiny_model):
    raised(InputError, tiny_model.forward, [[1, 2, 3], [4]], match=["input_ids", "rectangular"])


@pytest.mark.parametrize("field", ["attention_mask", "token_type_ids"])
def test_mask_or_token_types_of_another_shape(tiny_model, field):
    kw = {field: [[1, 0]]}
    raised(InputError, tiny_model.forward, [[1, 2, 3]], match=[field, "(1, 2)", "(1, 3)"], **kw)


def test_float_ids(tiny_model):
    raised(InputError, tiny_model.forward, np.array([[1.0, 2.5]]), match="integers")


def test_token_type_outside_type_vocab(tiny_model):
    raised(InputError, tiny_model.forward, [[1, 2]], None, [[0, 2]], match="type_vocab_size")


def test_mask_row_without_tokens(tiny_model):
    raised(InputError, tiny_model.forward, [[1, 2], [3, 4]], [[1, 1], [0, 0]], match="attention_mask")


def test_pairs_of_other_length(minilm):
    raised(InputError, minilm.tokenize, ["a", "b"], ["c"], match="pairs")


def test_texts_not_strings(minilm):
    raised(InputError, minilm.tokenize, [1, 2], match="strings")


def test_call_with_raw_array(tiny_model):
    raised(InputError, tiny_model, np.array([[1, 2]]), match="Encoding")


def test_classify_without_head(tmp_path):
    state = {k: v for k, v in tiny_state().items() if not k.startswith("classifier")}
    model = load(write_tiny(tmp_path / "m", state))
    raised(CheckpointError, model.classify, ["text"], match="classifier")


def test_nan_weights_never_pass_silently(tmp_path):
    state = tiny_state()
    state[Q0][0, 0] = np.nan
    raised(CheckpointError, load, write_tiny(tmp_path / "m", state), match=[Q0, "non-finite", "model.safetensors"])


def test_unknown_backend(tiny):
    raised(ConfigError, minifca.from_pretrained, tiny, backend="tpu", match=["tpu", "numpy"])


def test_every_error_is_a_value_error_too():
    """Callers that catch ValueError (or MinifcaError) catch every bad-input error."""
    for cls in (ConfigError, CheckpointError, TokenizerError, InputError):
        assert issubclass(cls, ValueError) and issubclass(cls, MinifcaError)
