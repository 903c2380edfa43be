"""Loading: legacy tensor names, vocab.txt-only tokenizers, hub ids from a local cache, memory mapping,
config fields, truncation."""
from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as stn

import minifca
from minifca.errors import CheckpointError, InputError

from conftest import write_random_checkpoint

TEXTS = ["Hello WORLD, this is a Café in Zürich!", "MiXeD CaSe tokens: iPhone, NASA and eBay.",
         "plain lower case words", "Naïve résumé façade", "unbelievable, isn't it?"]
SMALL = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 40, "vocab_size": 90,
             "max_position_embeddings": 24}


def file_backed(a) -> bool:
    """True when `a` is a view into a memory-mapped file (np.memmap / mmap), not a copy in its own memory."""
    while a is not None:
        if isinstance(a, (np.memmap, mmap.mmap)):
            return True
        a = getattr(a, "base", None)
    return False


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def link_folder(src: Path, dst: Path, names) -> Path:
    """A checkpoint folder made of symlinks to some files of `src` (no copy of the weights)."""
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        (dst / n).parent.mkdir(parents=True, exist_ok=True)
        (dst / n).symlink_to(src / n)
    return dst


# ---------------------------------------------------------------- tensor names


def test_legacy_gamma_beta_names(tmp_path):
    """An old checkpoint with LayerNorm.gamma/.beta (and a `bert.` prefix) gives the very same outputs."""
    src = write_random_checkpoint(tmp_path / "new", head="classifier", **SMALL)
    state = stn.load_file(str(src / "model.safetensors"))
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in state.items()}
    assert sum(".gamma" in k for k in legacy) == 2 * SMALL["num_hidden_layers"] + 1
    old = tmp_path / "old"
    old.mkdir()
    stn.save_file(legacy, str(old / "model.safetensors"))
    (old / "config.json").write_text((src / "config.json").read_text())
    ids = np.array([[5, 17, 3, 44, 2], [7, 8, 0, 0, 0]])
    mask = (ids > 0).astype(np.int64)
    a = minifca.from_pretrained(src, backend="numpy").forward(ids, mask)
    b = minifca.from_pretrained(old, backend="numpy").forward(ids, mask)
    np.testing.assert_array_equal(a.logits, b.logits)


def test_bare_bertmodel_names_and_tied_mlm_decoder(tmp_path):
    """BertModel names (no `bert.` prefix) load; BertForMaskedLM's tied decoder weight is the word embedding."""
    bare = minifca.from_pretrained(write_random_checkpoint(tmp_path / "bare", head=None, **SMALL), backend="numpy")
    assert "classifier" not in bare.params and "pooler" in bare.params
    mlm_dir = write_random_checkpoint(tmp_path / "mlm", head="mlm", **SMALL)
    names = stn.load_file(str(mlm_dir / "model.safetensors")).keys()
    mlm = minifca.from_pretrained(mlm_dir, backend="numpy")
    if "cls.predictions.decoder.weight" not in names:                  # tied: not written, taken from embeddings
        assert mlm.params["mlm"]["decoder"]["w"] is mlm.params["embeddings"]["word"]
    out = mlm.forward(np.array([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, SMALL["vocab_size"])


# ---------------------------------------------------------------- memory mapping


def test_weights_are_memory_mapped_not_copied(tmp_path):
    """A bert-base-sized fp32 checkpoint (~440 MB) loads as views of the mapped file: no second copy."""
    from minifca.weights import expected_shapes
    cfg = minifca.BertConfig(num_labels=2)
    shapes = {**expected_shapes(cfg), "pooler.dense.weight": (768, 768), "pooler.dense.bias": (768,)}
    stn.save_file({n: np.zeros(s, np.float32) for n, s in shapes.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    size = (tmp_path / "model.safetensors").stat().st_size
    assert size > 400e6
    before = rss_bytes()
    model = minifca.from_pretrained(tmp_path, backend="numpy")
    grown = rss_bytes() - before
    assert grown < 0.1 * size, f"loading grew RSS by {grown / 1e6:.0f} MB for a {size / 1e6:.0f} MB file"
    word = model.params["embeddings"]["word"]
    assert word.shape == (30522, 768) and word.dtype == np.float32
    assert file_backed(word) and not word.flags.owndata and not word.flags.writeable
    assert all(file_backed(layer["ffn"]["i"]["w"]) for layer in model.params["layers"])


def test_half_precision_is_upcast_to_float32(tmp_path):
    folder = write_random_checkpoint(tmp_path, dtype="bfloat16", head="classifier", **SMALL)
    model = minifca.from_pretrained(folder, backend="numpy")
    w = model.params["layers"][0]["attn"]["q"]["w"]
    assert w.dtype == np.float32 and not file_backed(w)
    with open(folder / "model.safetensors", "rb") as f:                # the file really holds bf16
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    assert np.isfinite(w).all() and np.abs(w).max() > 0


# ---------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("lower", [True, False])
def test_vocab_txt_only_tokenizer(tmp_path, minilm_path, lower):
    """Without tokenizer.json, vocab.txt + tokenizer_config.json (do_lower_case) tokenizes like transformers."""
    import transformers
    folder = link_folder(minilm_path, tmp_path / "m", ["config.json", "model.safetensors", "vocab.txt"])
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lower}))
    model = minifca.from_pretrained(folder, backend="numpy")
    hf = transformers.BertTokenizer(vocab=str(minilm_path / "vocab.txt"), do_lower_case=lower)
    ref = hf(TEXTS, TEXTS[::-1], padding=True, return_tensors="np")
    enc = model.tokenize(TEXTS, TEXTS[::-1])
    np.testing.assert_array_equal(enc.input_ids, ref["input_ids"])
    np.testing.assert_array_equal(enc.token_type_ids, ref["token_type_ids"])
    np.testing.assert_array_equal(enc.attention_mask, ref["attention_mask"])
    unk = (enc.input_ids == hf.unk_token_id).sum()
    assert (unk == 0) if lower else (unk > 0)                          # the uncased vocab lacks cased words
    if lower:                                                          # same ids as the folder's tokenizer.json
        full = minifca.from_pretrained(minilm_path, backend="numpy").tokenize(TEXTS, TEXTS[::-1])
        np.testing.assert_array_equal(enc.input_ids, full.input_ids)


def test_vocab_txt_defaults_to_lower_case(tmp_path, minilm_path):
    folder = link_folder(minilm_path, tmp_path / "m", ["config.json", "model.safetensors", "vocab.txt"])
    model = minifca.from_pretrained(folder, backend="numpy")
    assert model.tokenize(["HELLO"]).tokens[0] == ["[CLS]", "hello", "[SEP]"]


def test_truncation_matches_transformers(minilm_path):
    import transformers
    model = minifca.from_pretrained(minilm_path, backend="numpy")
    hf = transformers.AutoTokenizer.from_pretrained(str(minilm_path))
    long = ["word " * 40, "short one"]
    for pairs in (None, ["another rather long second segment " * 5, "x"]):
        ref = hf(long, pairs, truncation="longest_first", max_length=16, padding=True, return_tensors="np")
        enc = model.tokenize(long, pairs, max_length=16)
        np.testing.assert_array_equal(enc.input_ids, ref["input_ids"])
        np.testing.assert_array_equal(enc.token_type_ids, ref["token_type_ids"])
        assert enc.input_ids.shape[1] == 16


def test_config_id2label_names_the_classes(tmp_path):
    folder = write_random_checkpoint(tmp_path, head="classifier", num_labels=3,
                                     id2label={0: "neg", 1: "neutral", 2: "pos"},
                                     label2id={"neg": 0, "neutral": 1, "pos": 2}, **SMALL)
    model = minifca.from_pretrained(folder, backend="numpy")
    c = model.config
    assert c.num_labels == 3 and c.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    assert (c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size) == (32, 2, 40, 90)
    out = model.forward(np.array([[1, 2, 3]]))
    assert out.logits.shape == (1, 3)


# ---------------------------------------------------------------- hub ids


def fake_hub_cache(cache: Path, repo: str, src: Path, files) -> str:
    """The huggingface_hub cache layout for `repo`: blobs behind snapshots/<rev>/ and refs/main."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    root = cache / ("models--" + repo.replace("/", "--"))
    link_folder(src, root / "snapshots" / rev, files)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(rev)
    return rev


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)        # read once at import: set the module too
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_id_from_local_cache_offline(offline_cache, minilm_path):
    files = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
             "modules.json", "sentence_bert_config.json", "1_Pooling/config.json"]
    rev = fake_hub_cache(offline_cache, "sentence-transformers/all-MiniLM-L6-v2", minilm_path, files)
    model = minifca.from_pretrained("sentence-transformers/all-MiniLM-L6-v2", backend="numpy")
    assert model.path.name == rev and offline_cache in model.path.parents
    local = minifca.from_pretrained(minilm_path, backend="numpy")
    texts = ["A hub id resolved offline.", "Same weights, same output."]
    np.testing.assert_array_equal(model.embed(texts), local.embed(texts))


MINILM_FILES = ["config.json", "model.safetensors", "tokenizer.json"]


def test_hub_options_cache_dir_revision_local_files_only(tmp_path, minilm_path, monkeypatch):
    """cache_dir, revision and local_files_only reach huggingface_hub: a cache that only cache_dir names,
    no HF_HUB_OFFLINE, and local_files_only=True so nothing is asked of the network."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cache = tmp_path / "elsewhere"
    rev = fake_hub_cache(cache, "org/minilm", minilm_path, MINILM_FILES)
    for revision in (None, "main", rev):
        model = minifca.from_pretrained("org/minilm", backend="numpy", cache_dir=cache, local_files_only=True,
                                        revision=revision)
        assert model.path == cache / "models--org--minilm" / "snapshots" / rev
    with pytest.raises(CheckpointError, match="org/minilm.*at revision v9-not-there"):
        minifca.from_pretrained("org/minilm", backend="numpy", cache_dir=cache, local_files_only=True,
                                revision="v9-not-there")


def test_hub_options_passed_through(tmp_path, minilm_path, monkeypatch):
    import huggingface_hub
    seen = {}

    def fake_snapshot_download(repo_id, **kw):
        seen.update(kw, repo_id=repo_id)
        return str(link_folder(minilm_path, tmp_path / "snap", MINILM_FILES))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    minifca.from_pretrained("org/private", backend="numpy", revision="v1.0", cache_dir=tmp_path / "c",
                            local_files_only=True, token="hf_not_a_real_token")
    assert seen["repo_id"] == "org/private" and seen["revision"] == "v1.0" and seen["cache_dir"] == tmp_path / "c"
    assert seen["local_files_only"] is True and seen["token"] == "hf_not_a_real_token"
    assert "modules.json" in seen["allow_patterns"]


def test_hub_options_refused_for_a_local_folder(minilm_path):
    with pytest.raises(InputError, match="revision"):
        minifca.from_pretrained(minilm_path, revision="main")


def test_hub_id_through_environment_only(tmp_path, minilm_path):
    """A user's set-up: only HF_HUB_CACHE and HF_HUB_OFFLINE=1 in the environment of the `minifca` command."""
    import subprocess
    import sys
    cache = tmp_path / "hub"
    fake_hub_cache(cache, "org/minilm", minilm_path, ["config.json", "model.safetensors", "tokenizer.json"])
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    exe = Path(sys.executable).with_name("minifca")
    r = subprocess.run([str(exe), "run", "--model", "org/minilm", "--backend", "numpy", "--json", "a", "b"],
                       capture_output=True, text=True, env=env, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert str(cache) in res["model"] and len(res["embeddings"]) == 2


def test_hub_id_missing_from_cache_offline(offline_cache):
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE") as e:
        minifca.from_pretrained("nobody/not-cached-model", backend="numpy")
    assert "nobody/not-cached-model" in str(e.value)


def test_input_ids_path_without_tokenizer(tmp_path):
    """A checkpoint without tokenizer files still runs from ids; tokenize() says why it cannot."""
    model = minifca.from_pretrained(write_random_checkpoint(tmp_path, **SMALL), backend="numpy")
    assert model.tokenizer is None
    with pytest.raises(InputError, match="no tokenizer"):
        model.tokenize(["text"])
    assert model.forward([1, 2, 3]).logits.shape == (1, 2)
