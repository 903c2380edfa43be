"""Reading BERT weights from safetensors, memory-mapped, into the nested dict the reference uses.

A safetensors file is 8 bytes of little-endian header length, a JSON header
{name: {dtype, shape, data_offsets}}, then the raw tensors. float32 tensors stay views of
the memory-mapped file (no second copy of the checkpoint); float16/bfloat16 are upcast.
"""
from __future__ import annotations

import json
import math
import mmap as _mmap
import struct
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from .config import BertConfig
from .errors import CheckpointError

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}
# buffers some checkpoints carry that inference does not need
_IGNORED_SUFFIXES = ("position_ids", "token_type_ids")


def _json_object(pairs):
    """json.loads hook: a JSON object as a dict, refusing a key given twice (json would keep the last)."""
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"key {k!r} appears twice")
        d[k] = v
    return d


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_entry(path, name, info):
    """(dtype, shape, start, end) of one header entry, every field checked; sizes in Python ints (no wrap)."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: tensor {name!r} has a garbled header entry {info!r} (not an object)")
    dtype = info.get("dtype")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype!r}; safetensors dtypes are "
                              f"{', '.join(_DTYPES)}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has shape {shape!r}; a shape is a list of "
                              f"non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise CheckpointError(f"{path}: tensor {name!r} has data_offsets {offsets!r}; expected [start, end] "
                              f"integers")
    return dtype, tuple(shape), offsets[0], offsets[1]


def read_safetensors(path, mmap: bool = True) -> dict[str, np.ndarray]:
    """Read one .safetensors file; return {name: array} (fp16/bf16 upcast to fp32).

    mmap=True memory-maps the file: float32 tensors are views of it, no copy (if the file is
    truncated or rewritten while they are in use, the OS kills the process with SIGBUS).
    mmap=False reads the tensors into memory. The header is checked the way the format's
    specification states it: every entry names a known dtype, a shape of non-negative ints and
    [start, end] offsets; the tensors lie in the data section in order, without gaps or overlaps,
    each exactly prod(shape) * itemsize bytes (computed with Python ints: no int64 wrap-around).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{path}: garbled or truncated safetensors header (header length {n}, "
                                      f"file {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_json_object)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: garbled safetensors header ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: garbled safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    entries = sorted(((*_check_entry(path, name, info), name) for name, info in header.items()),
                     key=lambda e: (e[2], e[3]))
    pos = 0
    for dtype, shape, start, end, name in entries:
        nbytes = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize  # Python ints: exact
        where = f"offsets {start}..{end}, data section {data_size} bytes"
        if end > data_size:
            raise CheckpointError(f"{path}: tensor {name!r} lies outside the file ({where}): truncated or garbled")
        if start != pos or end - start != nbytes:
            what = ("overlaps the tensor before it" if start < pos else "leaves a gap before it" if start > pos
                    else f"spans {end - start} bytes but its shape {list(shape)} of {dtype} needs {nbytes}")
            raise CheckpointError(f"{path}: tensor {name!r} {what} ({where}); safetensors tensors fill the data "
                                  f"section in order, without gaps or overlaps: garbled header")
        pos = end
    if pos != data_size:
        raise CheckpointError(f"{path}: {data_size - pos} bytes after the last tensor (data section {data_size} "
                              f"bytes, tensors {pos}): garbled header or a file with something appended")
    mapped = None
    if data_size == 0:
        data = np.zeros(0, np.uint8)
    elif mmap:
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
        mapped = getattr(data, "_mmap", None)                        # the mmap.mmap under it
    else:
        data = np.fromfile(path, dtype=np.uint8, offset=8 + n)
        data.flags.writeable = False                                 # as the memory-mapped arrays
    out = {}
    for dtype, shape, start, end, name in entries:
        arr = data[start:end].view(_DTYPES[dtype]).reshape(shape)
        if dtype == "BF16":  # bfloat16 is the top half of a float32
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        elif dtype in ("F16", "F64"):
            with np.errstate(over="ignore"):                         # too large for float32: inf, refused below
                arr = arr.astype(np.float32)
        elif not arr.flags.aligned:                                  # a header whose length is not a multiple
            arr = arr.copy()                                         # of 8: the kernels want aligned arrays,
            arr.flags.writeable = False                              # read-only as the mapped ones (one Numba type)
        if arr.dtype.kind == "f":
            _check_finite(arr, name, path)
        out[name] = arr
    if mapped is not None and hasattr(mapped, "madvise") and hasattr(_mmap, "MADV_DONTNEED"):
        mapped.madvise(_mmap.MADV_DONTNEED)  # the check read every page: unmap them from this process (they
    return out                               # stay in the page cache) so RSS counts only what a forward touches


def release_pages(tree) -> int:
    """Unmap from this process the pages read so far of every memory-mapped file under the arrays of `tree`
    (nested dicts / lists): after load-time checks or a copy have read them, RSS then counts only what is used
    next, and the file's pages stay in the page cache, read back if a mapped array is used again. Returns how many
    mappings were released."""
    seen = {}

    def walk(node):
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)
        elif isinstance(node, np.ndarray):
            while node is not None and getattr(node, "_mmap", None) is None:
                node = node.base if isinstance(node.base, np.ndarray) else None
            if node is not None:
                seen[id(node._mmap)] = node._mmap
    walk(tree)
    for mapped in seen.values():
        if hasattr(mapped, "madvise") and hasattr(_mmap, "MADV_DONTNEED"):
            mapped.madvise(_mmap.MADV_DONTNEED)
    return len(seen)


def read_shard_index(index: Path) -> list[str]:
    """The shard files a model.safetensors.index.json names (sorted), each checked to stay in its folder.

    The index is UTF-8 JSON {"weight_map": {tensor name: shard file name}, ...}; the map is non-empty and
    every shard is a relative path inside the folder (no `..`, not absolute) that exists.
    """
    try:
        d = json.loads(index.read_bytes().decode("utf-8"), object_pairs_hook=_json_object)
    except OSError as e:
        raise CheckpointError(f"{index}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{index}: malformed shard index, not UTF-8 JSON ({type(e).__name__}: {e})") from None
    weight_map = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: malformed shard index: 'weight_map' must be a non-empty object "
                              f"{{tensor name: shard file}}, got {type(weight_map).__name__}")
    bad = [(k, v) for k, v in weight_map.items() if not isinstance(v, str) or not v]
    if bad:
        raise CheckpointError(f"{index}: malformed shard index: 'weight_map' entry {bad[0][0]!r} is {bad[0][1]!r}, "
                              f"not a shard file name")
    files = sorted(set(weight_map.values()))
    for f in files:
        p = PurePosixPath(f.replace("\\", "/"))
        if p.is_absolute() or PureWindowsPath(f).drive or ".." in p.parts or "\x00" in f:
            raise CheckpointError(f"{index}: shard {f!r} lies outside the checkpoint's folder; shards are "
                                  f"file names relative to it (no '..', not absolute)")
    missing = [f for f in files if not (index.parent / f).is_file()]
    if missing:
        raise CheckpointError(f"{index}: shard file(s) missing: {', '.join(missing)}")
    return files


def find_weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (one file, or the shards of an index)."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        return [folder / f for f in read_shard_index(index)]
    pickles = [p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    if pickles:
        raise CheckpointError(
            f"{folder}: only pickle checkpoints found ({', '.join(sorted(pickles))}). minifca never unpickles "
            f"(it can run code). Convert once where torch is installed:\n"
            f"  python -c \"import torch, safetensors.torch as st; "
            f"sd = torch.load('{folder / min(pickles)}', weights_only=True); "
            f"st.save_file({{k: v.contiguous() for k, v in sd.items()}}, '{folder / 'model.safetensors'}')\"\n"
            f"or with transformers: AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json found")


def _canonical(name: str) -> str | None:
    """Checkpoint name -> BertModel-style name ('encoder.layer.0....', 'classifier.weight', 'cls....')."""
    name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    name = name.removeprefix("bert.")
    if name.endswith(_IGNORED_SUFFIXES):
        return None
    return name


def expected_shapes(cfg: BertConfig) -> dict[str, tuple]:
    """Every tensor a BertModel needs, with its shape (HF Linear weights are [out, in])."""
    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    s = {"embeddings.word_embeddings.weight": (V, H),
         "embeddings.position_embeddings.weight": (cfg.max_position_embeddings, H),
         "embeddings.token_type_embeddings.weight": (cfg.type_vocab_size, H),
         "embeddings.LayerNorm.weight": (H,), "embeddings.LayerNorm.bias": (H,)}
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}."
        for m in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            s[p + m + ".weight"], s[p + m + ".bias"] = (H, H), (H,)
        s[p + "intermediate.dense.weight"], s[p + "intermediate.dense.bias"] = (I, H), (I,)
        s[p + "output.dense.weight"], s[p + "output.dense.bias"] = (H, I), (H,)
        for m in ("attention.output.LayerNorm", "output.LayerNorm"):
            s[p + m + ".weight"], s[p + m + ".bias"] = (H,), (H,)
    return s


def optional_shapes(cfg: BertConfig) -> dict[str, tuple]:
    """Tensors of the optional parts: pooler, classifier head, masked-LM head."""
    H, V = cfg.hidden_size, cfg.vocab_size
    return {"pooler.dense.weight": (H, H), "pooler.dense.bias": (H,),
            "classifier.weight": (cfg.num_labels, H), "classifier.bias": (cfg.num_labels,),
            "cls.predictions.transform.dense.weight": (H, H), "cls.predictions.transform.dense.bias": (H,),
            "cls.predictions.transform.LayerNorm.weight": (H,), "cls.predictions.transform.LayerNorm.bias": (H,),
            "cls.predictions.bias": (V,), "cls.predictions.decoder.weight": (V, H),
            "cls.predictions.decoder.bias": (V,)}


def load_state(files: list[Path], cfg: BertConfig, mmap: bool = True) -> dict[str, np.ndarray]:
    """Read, rename and check every tensor against the config; error messages name the tensor.

    Checked once here: names, shapes, dtypes and that every part of a head is there (`HEADS`);
    `read_safetensors` has checked that every value is finite.
    """
    state, where = {}, {}
    for f in files:
        for raw, arr in read_safetensors(f, mmap=mmap).items():
            name = _canonical(raw)
            if name is None:
                continue
            if name in state:
                raise CheckpointError(f"{f}: tensor {raw!r} is also in {where[name]} (as {name!r}); "
                                      f"a checkpoint holds each tensor once")
            state[name], where[name] = arr, f
    need, opt = expected_shapes(cfg), optional_shapes(cfg)
    missing = [n for n in need if n not in state]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{files[0].parent}: missing tensor(s) {', '.join(missing[:5])}{more}")
    unexpected = [n for n in state if n not in need and n not in opt and not n.startswith("cls.seq_relationship")]
    if unexpected:
        raise CheckpointError(f"{where[unexpected[0]]}: unexpected tensor(s) {', '.join(unexpected[:5])} "
                              f"(not part of a BERT of this config)")
    for n, arr in state.items():
        shape = need.get(n) or opt.get(n)
        if shape is not None and tuple(arr.shape) != shape:
            raise CheckpointError(f"{where[n]}: tensor {n!r} has shape {tuple(arr.shape)}, expected {shape} "
                                  f"from config.json")
        if arr.dtype != np.float32 and shape is not None:
            raise CheckpointError(f"{where[n]}: tensor {n!r} has dtype {arr.dtype}, expected a float type")
    _check_heads(state, cfg, files[0].parent)
    return state


def _check_finite(arr, name, where, chunk=1 << 22):
    """CheckpointError naming the tensor and the first bad position if `arr` holds a NaN or an inf.

    np.isfinite in chunks of 4M values (a 16 MiB float32 slice, 4 MiB of booleans at a time), which is
    faster than one float64 sum over the tensor.
    """
    flat = arr.reshape(-1)
    for lo in range(0, flat.size, chunk):
        ok = np.isfinite(flat[lo:lo + chunk])
        if not ok.all():
            i = tuple(int(v) for v in np.unravel_index(lo + int(np.argmin(ok)), arr.shape))
            raise CheckpointError(f"{where}: tensor {name!r} holds non-finite values (first: {arr[i]} at "
                                  f"{list(i)}): the checkpoint is corrupt")


# Every head, as the tensors it needs (BertModel names); a head is there when any of its tensors is.
HEADS = {"pooler": ("pooler.dense.weight", "pooler.dense.bias"),
         "classifier": ("classifier.weight", "classifier.bias"),
         "masked-LM head": ("cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
                            "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias")}
# Architectures whose head minifca does not run; refused by name rather than run as a bare encoder.
UNSUPPORTED = ("BertForMultipleChoice", "BertForQuestionAnswering", "BertForNextSentencePrediction",
               "BertLMHeadModel")
TOKEN_CLASSIFICATION = "BertForTokenClassification"


def _check_heads(state, cfg: BertConfig, folder):
    """Each head whole; a classifier on a pooler unless config.json says it classifies tokens."""
    refused = [a for a in cfg.architectures if a in UNSUPPORTED]
    if refused:
        raise CheckpointError(f"{folder}: config.json 'architectures' is {refused[0]}, whose head minifca does not "
                              f"run (it runs BertModel, BertForSequenceClassification, {TOKEN_CLASSIFICATION}, "
                              f"BertForMaskedLM and BertForPreTraining checkpoints)")
    for head, names in HEADS.items():
        have = [n for n in names if n in state]
        if have and len(have) < len(names):
            missing = next(n for n in names if n not in state)
            raise CheckpointError(f"{folder}: the {head} is incomplete: tensor {missing!r} is missing "
                                  f"({have[0]!r} is there)")
    if "cls.predictions.transform.dense.weight" in state and not (
            "cls.predictions.bias" in state or "cls.predictions.decoder.bias" in state):
        raise CheckpointError(f"{folder}: the masked-LM head is incomplete: tensor 'cls.predictions.bias' is missing")
    token = TOKEN_CLASSIFICATION in cfg.architectures
    if "classifier.weight" in state and "pooler.dense.weight" not in state and not token:
        raise CheckpointError(f"{folder}: tensor 'pooler.dense.weight' is missing: a sequence classifier "
                              f"(classifier.*) reads the pooler's output (a {TOKEN_CLASSIFICATION} checkpoint, "
                              f"which has no pooler, says so in config.json 'architectures')")
    if token and "classifier.weight" not in state:
        raise CheckpointError(f"{folder}: config.json says {TOKEN_CLASSIFICATION} but tensor 'classifier.weight' "
                              f"is missing")


def _ln(state, p):
    return {"g": state[p + ".weight"], "b": state[p + ".bias"]}


def _lin(state, p):
    return {"w": state[p + ".weight"], "b": state[p + ".bias"]}


def to_params(state: dict[str, np.ndarray], cfg: BertConfig) -> dict:
    """Flat checkpoint names -> the nested parameter dict of reference.py."""
    params = {"embeddings": {"word": state["embeddings.word_embeddings.weight"],
                             "position": state["embeddings.position_embeddings.weight"],
                             "token_type": state["embeddings.token_type_embeddings.weight"],
                             "ln": _ln(state, "embeddings.LayerNorm")},
              "layers": []}
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}."
        params["layers"].append({
            "attn": {"q": _lin(state, p + "attention.self.query"), "k": _lin(state, p + "attention.self.key"),
                     "v": _lin(state, p + "attention.self.value"), "o": _lin(state, p + "attention.output.dense")},
            "attn_ln": _ln(state, p + "attention.output.LayerNorm"),
            "ffn": {"i": _lin(state, p + "intermediate.dense"), "o": _lin(state, p + "output.dense")},
            "ffn_ln": _ln(state, p + "output.LayerNorm")})
    if "pooler.dense.weight" in state:
        params["pooler"] = _lin(state, "pooler.dense")
    if "classifier.weight" in state:  # on the pooler's output, or on every token (_check_heads decided which)
        token = TOKEN_CLASSIFICATION in cfg.architectures
        params["token_classifier" if token else "classifier"] = _lin(state, "classifier")
    if "cls.predictions.transform.dense.weight" in state:
        decoder_w = state.get("cls.predictions.decoder.weight", params["embeddings"]["word"])  # tied
        bias = state.get("cls.predictions.bias", state.get("cls.predictions.decoder.bias"))
        params["mlm"] = {"transform": _lin(state, "cls.predictions.transform.dense"),
                         "ln": _ln(state, "cls.predictions.transform.LayerNorm"),
                         "decoder": {"w": decoder_w, "b": bias}}
    return params


def from_params(params: dict) -> dict[str, np.ndarray]:
    """The nested parameter dict of reference.py -> flat BertModel-style names: `to_params` undone."""
    ln = lambda d, p: {p + ".weight": d["g"], p + ".bias": d["b"]}
    lin = lambda d, p: {p + ".weight": d["w"], p + ".bias": d["b"]}
    e = params["embeddings"]
    state = {"embeddings.word_embeddings.weight": e["word"], "embeddings.position_embeddings.weight": e["position"],
             "embeddings.token_type_embeddings.weight": e["token_type"], **ln(e["ln"], "embeddings.LayerNorm")}
    for i, layer in enumerate(params["layers"]):
        p = f"encoder.layer.{i}."
        for key, name in (("q", "attention.self.query"), ("k", "attention.self.key"), ("v", "attention.self.value"),
                          ("o", "attention.output.dense")):
            state.update(lin(layer["attn"][key], p + name))
        state.update(ln(layer["attn_ln"], p + "attention.output.LayerNorm"))
        state.update(lin(layer["ffn"]["i"], p + "intermediate.dense"))
        state.update(lin(layer["ffn"]["o"], p + "output.dense"))
        state.update(ln(layer["ffn_ln"], p + "output.LayerNorm"))
    if "pooler" in params:
        state.update(lin(params["pooler"], "pooler.dense"))
    if "classifier" in params:
        state.update(lin(params["classifier"], "classifier"))
    if "mlm" in params:
        m = params["mlm"]
        state.update(lin(m["transform"], "cls.predictions.transform.dense"))
        state.update(ln(m["ln"], "cls.predictions.transform.LayerNorm"))
        state.update({"cls.predictions.decoder.weight": m["decoder"]["w"], "cls.predictions.bias": m["decoder"]["b"]})
    return state
