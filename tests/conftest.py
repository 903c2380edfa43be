"""Shared fixtures: where the assets are, and random-weight checkpoints written by transformers."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MINIFCA_SHARED", ROOT.parent / "shared"))
SST2_MODEL = SHARED / "models" / "minilm-l6-sst2"
SST2_DEV = SHARED / "data" / "sst2" / "dev.tsv"
SST2_TRAIN = SHARED / "data" / "sst2" / "train.tsv"

settings.register_profile("minifca", deadline=None, max_examples=15, derandomize=True)
settings.load_profile("minifca")


def read_sst2(path, limit=None):
    """(sentences, labels) of a GLUE SST-2 TSV (header `sentence<TAB>label`)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()[1:]
    rows = [line.rsplit("\t", 1) for line in lines if line.strip()]
    rows = rows[:limit] if limit else rows
    return [s.strip() for s, _ in rows], np.array([int(y) for _, y in rows])


def write_random_checkpoint(folder, seed=0, dtype="float32", max_shard_size=None, head="classifier", **shape):
    """A random-weight BERT written by transformers (save_pretrained, safetensors). Returns the folder.

    shape: any BertConfig fields (hidden_size, num_hidden_layers, ...). head: "classifier",
    "mlm" or None (BertModel). dtype: "float32", "float16" or "bfloat16".
    """
    import torch
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(**shape)
    cls = {"classifier": transformers.BertForSequenceClassification, "mlm": transformers.BertForMaskedLM,
           None: transformers.BertModel}[head]
    model = cls(cfg).eval()
    with torch.no_grad():  # break the zero-init symmetry of biases/LayerNorms so every tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model = model.to(getattr(torch, dtype))
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kw)
    return Path(folder)


def torch_reference(folder, head="classifier"):
    """The transformers model of a checkpoint folder, in float32, eval mode."""
    import torch
    import transformers
    cls = {"classifier": transformers.BertForSequenceClassification, "mlm": transformers.BertForMaskedLM,
           None: transformers.BertModel}[head]
    return cls.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def minilm_path():
    import minifca
    return minifca.default_model_path()


@pytest.fixture(scope="session")
def sst2_path():
    assert SST2_MODEL.is_dir(), f"shared SST-2 checkpoint missing at {SST2_MODEL}"
    return SST2_MODEL
