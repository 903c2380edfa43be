"""Reading BERT weights from safetensors, memory-mapped, into the nested dict the reference uses.

A safetensors file is 8 bytes of little-endian header length, a JSON header
{name: {dtype, shape, data_offsets}}, then the raw tensors. float32 tensors stay views of
the memory-mapped file (no second copy of the checkpoint); float16/bfloat16 are upcast.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from .config import BertConfig
from .errors import CheckpointError

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}
# buffers some checkpoints carry that inference does not need
_IGNORED_SUFFIXES = ("position_ids", "token_type_ids")


def read_safetensors(path) -> dict[str, np.ndarray]:
    """Memory-map one .safetensors file; return {name: array} (fp16/bf16 upcast to fp32)."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: garbled or truncated safetensors header (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: garbled safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: garbled safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a garbled header entry {info!r}") from None
        count = int(np.prod(shape, dtype=np.int64))
        if not 0 <= start <= end <= data.size or end - start != count * np.dtype(dtype).itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} lies outside the file or has the wrong byte size "
                                  f"(offsets {start}..{end}, file data {data.size} bytes): truncated or garbled")
        arr = data[start:end].view(dtype).reshape(shape)
        if info["dtype"] == "BF16":  # bfloat16 is the top half of a float32
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        elif dtype in (np.float16, np.float64):
            arr = arr.astype(np.float32)
        out[name] = arr
    return out


def find_weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (one file, or the shards of an index)."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: malformed shard index ({e!r})") from None
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard file(s) missing: {', '.join(missing)}")
        return [folder / f for f in files]
    pickles = [p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    if pickles:
        raise CheckpointError(
            f"{folder}: only pickle checkpoints found ({', '.join(sorted(pickles))}). minifca never unpickles "
            f"(it can run code). Convert once where torch is installed:\n"
            f"  python -c \"import torch, safetensors.torch as st; "
            f"sd = torch.load('{folder / sorted(pickles)[0]}', weights_only=True); "
            f"st.save_file({{k: v.contiguous() for k, v in sd.items()}}, '{folder / 'model.safetensors'}')\"\n"
            f"or with transformers: AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json found")


def _canonical(name: str) -> str | None:
    """Checkpoint name -> BertModel-style name ('encoder.layer.0....', 'classifier.weight', 'cls....')."""
    name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    if name.startswith("bert."):
        name = name[len("bert."):]
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


def load_state(files: list[Path], cfg: BertConfig) -> dict[str, np.ndarray]:
    """Read, rename and check every tensor against the config; error messages name the tensor."""
    state, where = {}, {}
    for f in files:
        for raw, arr in read_safetensors(f).items():
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
    return state


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
    if "classifier.weight" in state:
        params["classifier"] = _lin(state, "classifier")
    if "cls.predictions.transform.dense.weight" in state:
        decoder_w = state.get("cls.predictions.decoder.weight", params["embeddings"]["word"])  # tied
        bias = state.get("cls.predictions.bias", state.get("cls.predictions.decoder.bias"))
        if bias is None:
            raise CheckpointError("missing tensor cls.predictions.bias (masked-LM head)")
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
