"""Property-based fuzzing of the files minifca reads: a mutated safetensors header, config.json,
tokenizer_config.json or FCA schedule either loads and runs, or raises minifca's own error for that
file (a MinifcaError subclass) — never another exception, a crash or a hang.

Where it loads, what it gives is checked against an oracle: a mutated safetensors file must also be
accepted by the safetensors library itself with the same tensors (minifca is never more lenient than
the format's reference reader, and reads the same bytes); a mutated config.json or tokenizer_config.json
that means what the original means runs exactly as the original; any other that loads runs to finite
outputs of the right shape. Each test is bounded by pytest-timeout (a hang fails it), each example by
Hypothesis' deadline.
"""
from __future__ import annotations

import json
import shutil
import struct
import tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as stn
from hypothesis import HealthCheck, given, settings, strategies as st
from test_errors import CFG, write_tiny

import minifca
from minifca.config import BertConfig
from minifca.errors import CheckpointError, ConfigError, MinifcaError, TokenizerError

FUZZ = settings(max_examples=40, deadline=timedelta(seconds=20),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
IDS = [[2, 7, 11, 5, 9, 3], [2, 8, 3, 0, 0, 0]]
MASK = [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]

# any JSON value, with the awkward ones weighted in: huge and negative ints, inf/NaN, deep lists
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.integers(-3, 64),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                    st.sampled_from(["F32", "F16", "BF16", "I64", "gelu", "relu", "bert", "weighted", "drop"]))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                    max_leaves=8)
# what a shape or data_offsets field holds when a writer gets it wrong: lists of odd numbers
DIMS = st.lists(st.one_of(st.integers(-2 ** 66, 2 ** 66), st.integers(-1, 20000), st.floats(), st.booleans()),
                max_size=3)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A tiny valid checkpoint (with a WordPiece vocab.txt tokenizer) and what it gives."""
    folder = write_tiny(tmp_path_factory.mktemp("fuzz") / "tiny")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(45)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    model = minifca.from_pretrained(folder, backend="numpy")
    return folder, model.forward(IDS, MASK).logits, model.tokenize(["w1 W2 w3", "w4"]).input_ids


def run(folder):
    model = minifca.from_pretrained(folder, backend="numpy")
    return model, model.forward(IDS, MASK)


def copy_of(folder) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="minifca-fuzz-"))
    return Path(shutil.copytree(folder, tmp / "m"))


# ---------------------------------------------------------------- safetensors header


def _split(data: bytes):
    n = struct.unpack("<Q", data[:8])[0]
    return n, data[8:8 + n], data[8 + n:]


def _byte_mutations():
    """Up to 4 header bytes (the length prefix included) replaced, deleted or inserted."""
    edit = st.tuples(st.sampled_from(["set", "delete", "insert"]), st.integers(0, 10 ** 6), st.integers(0, 255))
    return st.lists(edit, min_size=1, max_size=4)


def _apply_bytes(data: bytes, edits) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    head, body = bytearray(data[:8 + n]), data[8 + n:]
    for op, pos, byte in edits:
        pos %= len(head)
        if op == "set":
            head[pos] = byte
        elif op == "delete" and pos >= 8:
            del head[pos]
        elif op == "insert" and pos >= 8:
            head.insert(pos, byte)
    return bytes(head) + body


def _apply_json(data: bytes, edits) -> bytes:
    _n, raw, body = _split(data)
    header = json.loads(raw)
    names = sorted(k for k in header if k != "__metadata__")
    for which, field, value in edits:
        name = names[which % len(names)]
        if field == "entry":
            header[name] = value
        elif field == "new tensor":
            header[f"extra.{which}"] = value
        elif value is None and isinstance(header[name], dict):
            header[name].pop(field, None)
        elif isinstance(header[name], dict):
            header[name][field] = value
    new = json.dumps(header).encode()
    return struct.pack("<Q", len(new)) + new + body


def _oracle(f):
    """The safetensors library's own reading of the file, or None when it refuses it."""
    try:
        return stn.load_file(str(f))
    except Exception:  # safetensors raises its own SafetensorError, and others, on a garbled file  # noqa: BLE001
        return None


def _check_header_mutation(original, mutated_bytes):
    folder, logits, _ = original
    m = copy_of(folder)
    f = m / "model.safetensors"
    f.write_bytes(mutated_bytes)
    try:
        try:
            _model, out = run(m)
        except MinifcaError as e:
            assert isinstance(e, (CheckpointError, ConfigError, TokenizerError)) or "non-finite" in str(e), repr(e)
            return
        oracle = _oracle(f)
        assert oracle is not None, "minifca loaded a file the safetensors library refuses"
        ours = minifca.weights.read_safetensors(f)
        assert sorted(ours) == sorted(oracle)
        for name in ours:
            a, b = ours[name], oracle[name]
            if b.dtype == np.float16 or b.dtype.name == "bfloat16":
                b = b.astype(np.float32)
            np.testing.assert_array_equal(a, b, err_msg=name)
        if mutated_bytes[8:] .strip() == (folder / "model.safetensors").read_bytes()[8:].strip():
            np.testing.assert_array_equal(out.logits, logits)
        assert np.isfinite(out.last_hidden_state).all()
    finally:
        shutil.rmtree(m.parent)


@pytest.mark.timeout(300)
@FUZZ
@given(edits=_byte_mutations())
def test_safetensors_header_bytes(original, edits):
    data = (original[0] / "model.safetensors").read_bytes()
    _check_header_mutation(original, _apply_bytes(data, edits))


@pytest.mark.timeout(300)
@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 100), st.sampled_from(["dtype", "shape", "data_offsets", "entry",
                                                                      "new tensor"]), st.one_of(JSON, DIMS)),
                      min_size=1, max_size=3))
def test_safetensors_header_json(original, edits):
    data = (original[0] / "model.safetensors").read_bytes()
    _check_header_mutation(original, _apply_json(data, edits))


# ---------------------------------------------------------------- config.json and tokenizer_config.json

CONFIG_FIELDS = sorted(CFG) + ["num_labels", "id2label", "label2id", "architectures", "pad_token_id", "layer_norm_eps",
                               "position_embedding_type", "is_decoder"]


def _json_edits(fields):
    return st.lists(st.tuples(st.sampled_from(fields), st.one_of(st.just("<delete>"), JSON)), min_size=1, max_size=3)


def _edit(d: dict, edits) -> dict:
    d = dict(d)
    for field, value in edits:
        if value == "<delete>":
            d.pop(field, None)
        else:
            d[field] = value
    return d


def _check_json_file(original, name, text: bytes, same_meaning, errors):
    folder, logits, ids = original
    m = copy_of(folder)
    (m / name).write_bytes(text)
    try:
        try:
            model, out = run(m)
            got_ids = model.tokenize(["w1 W2 w3", "w4"]).input_ids
        except MinifcaError as e:
            assert isinstance(e, errors), f"{type(e).__name__}: {e}"
            assert name in str(e) or "tensor" in str(e) or "non-finite" in str(e), str(e)
            return
        assert np.isfinite(out.last_hidden_state).all() and out.last_hidden_state.shape[:2] == (2, 6)
        if same_meaning:
            np.testing.assert_array_equal(out.logits, logits)
            np.testing.assert_array_equal(got_ids, ids)
    finally:
        shutil.rmtree(m.parent)


@pytest.mark.timeout(300)
@FUZZ
@given(edits=_json_edits(CONFIG_FIELDS))
def test_config_json_fields(original, edits):
    d = _edit(CFG, edits)
    try:
        same = BertConfig.from_dict(d) == BertConfig.from_dict(CFG)
    except MinifcaError:
        same = False
    _check_json_file(original, "config.json", json.dumps(d).encode(), same,
                     (ConfigError, CheckpointError, TokenizerError, minifca.errors.InputError))


@pytest.mark.timeout(300)
@FUZZ
@given(edits=_byte_mutations())
def test_config_json_bytes(original, edits):
    text = json.dumps(CFG, indent=1).encode()
    mutated = _apply_bytes(struct.pack("<Q", len(text)) + text, edits)[8:]   # same mutations, no prefix
    try:
        same = json.loads(mutated) == CFG
    except ValueError:
        same = False
    _check_json_file(original, "config.json", mutated, same,
                     (ConfigError, CheckpointError, TokenizerError, minifca.errors.InputError))


@pytest.mark.timeout(300)
@FUZZ
@given(edits=_json_edits(["do_lower_case", "model_max_length", "tokenizer_class", "strip_accents"]),
       as_list=st.booleans())
def test_tokenizer_config_json(original, edits, as_list):
    d = _edit({"do_lower_case": True}, edits)
    obj = [d] if as_list else d
    same = not as_list and d.get("do_lower_case", True) is True
    _check_json_file(original, "tokenizer_config.json", json.dumps(obj).encode(), same, (TokenizerError,))


@pytest.mark.timeout(300)
@FUZZ
@given(edits=_byte_mutations())
def test_tokenizer_config_bytes(original, edits):
    text = json.dumps({"do_lower_case": True}).encode()
    mutated = _apply_bytes(struct.pack("<Q", len(text)) + text, edits)[8:]
    try:
        d = json.loads(mutated)
        same = isinstance(d, dict) and d.get("do_lower_case", True) is True
    except ValueError:
        same = False
    _check_json_file(original, "tokenizer_config.json", mutated, same, (TokenizerError,))


# ---------------------------------------------------------------- FCA schedule files

SCHEDULE = {"keep": [0.7, 0.5], "score": "attention_received", "aggregate": "clusters", "clusters": 2,
            "proportional_attention": False, "start_layer": 0, "seed": 0}


@pytest.fixture(scope="module")
def schedule_model(original):
    return minifca.from_pretrained(original[0], backend="numba")


@pytest.mark.timeout(300)
@FUZZ
@given(edits=_json_edits(sorted(SCHEDULE) + ["comment", "extra"]), raw=_byte_mutations(), bytes_too=st.booleans())
def test_fca_schedule(original, schedule_model, edits, raw, bytes_too):
    text = json.dumps(_edit(SCHEDULE, edits)).encode()
    if bytes_too:
        text = _apply_bytes(struct.pack("<Q", len(text)) + text, raw)[8:]
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "schedule.json"
        f.write_bytes(text)
        try:
            fca = minifca.FCAConfig.load(f)
            out = schedule_model.forward(IDS, MASK, fca=fca)
        except MinifcaError as e:
            assert isinstance(e, ConfigError), f"{type(e).__name__}: {e}"
            return
        ref = minifca.from_pretrained(original[0], backend="numpy").forward(IDS, MASK, fca=fca)
        assert np.isfinite(out.logits).all()
        np.testing.assert_array_equal(out.mask, ref.mask)          # numba decides the same units as the reference
