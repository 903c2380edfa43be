"""Each checkpoint shape also through safetensors files written in fp16 and split into shards:
for the two real checkpoints (all-MiniLM-L6-v2, the SST-2 fine-tune) and the bert-base shape, not only the
hypothesis-drawn small shapes of test_parity.py."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from test_parity import compare_random

import minifca

from conftest import write_random_checkpoint

KEEP = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def fp16_shards(src, dst, n_shards=3):
    """src/model.safetensors rewritten in fp16 as n shards + model.safetensors.index.json (save_pretrained's layout)."""
    dst.mkdir()
    for name in KEEP:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    tensors = load_file(str(src / "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for i in range(n_shards):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: (tensors[k].astype(np.float16) if tensors[k].dtype == np.float32 else tensors[k])
                for k in names[i::n_shards]}
        save_file(part, str(dst / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


@pytest.mark.parametrize("which, head", [("minilm", None), ("sst2", "classifier")])
def test_real_checkpoints_as_fp16_shards(tmp_path, minilm_path, sst2_path, which, head):
    folder = fp16_shards(minilm_path if which == "minilm" else sst2_path, tmp_path / which)
    assert not (folder / "model.safetensors").exists() and len(list(folder.glob("model-*.safetensors"))) == 3
    compare_random(folder, head, "numba", batch=3, length=16)
    model = minifca.from_pretrained(folder)
    dtypes = {p.dtype for p in _leaves(model.params)}
    assert dtypes == {np.dtype(np.float32)}                                     # upcast on load


@pytest.mark.slow
def test_bert_base_shape_as_fp16_shards(tmp_path):
    folder = write_random_checkpoint(tmp_path, dtype="float16", max_shard_size="100MB", head=None,
                                     num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
                                     intermediate_size=3072)
    assert len(list(folder.glob("model-*.safetensors"))) >= 2
    compare_random(folder, None, "numba", batch=2, length=9)


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _leaves(v)
    elif isinstance(tree, np.ndarray):
        yield tree
