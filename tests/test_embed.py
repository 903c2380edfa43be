"""Model.embed / Model.classify on mixed-length text: sorted batches, input order, sentence-transformers' files."""
from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest

import minifca
from minifca.errors import ConfigError, InputError

from conftest import EPS32, SST2_TRAIN, assert_f32_close, model_bound, read_sst2


@pytest.fixture(scope="module")
def sst2(sst2_path):
    return minifca.from_pretrained(sst2_path)


@pytest.fixture(scope="module")
def mixed():
    """40 SST-2 sentences of 3 to 60 tokens, in the file's order (mixed lengths)."""
    return read_sst2(SST2_TRAIN, limit=40)[0]


def assert_forward_close(got, ref, cfg, extra_depth=1):
    """Two float32 forwards of the same texts in other batches/orders (conftest.model_bound), + the pooling."""
    diff = float(np.abs(np.asarray(got, np.float64) - ref).max())
    assert diff <= model_bound(ref, cfg, extra_depth), (diff, model_bound(ref, cfg, extra_depth))


def variant(src, tmp_path, modules=None, pooling=None, sentence=None):
    """A copy of a sentence-transformers folder (weights linked, not copied) with its JSON files replaced."""
    dst = tmp_path / "variant"
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.name not in ("modules.json", "sentence_bert_config.json"):
            (dst / f.name).symlink_to(f)
    shutil.copytree(src / "1_Pooling", dst / "1_Pooling")
    default = json.loads((src / "modules.json").read_text())
    (dst / "modules.json").write_text(json.dumps(default if modules is None else modules))
    (dst / "sentence_bert_config.json").write_text(json.dumps(
        sentence or json.loads((src / "sentence_bert_config.json").read_text())))
    if pooling is not None:
        (dst / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return dst


def modules(*kinds):
    paths = {"Transformer": "", "Pooling": "1_Pooling", "Normalize": "2_Normalize", "Dense": "2_Dense"}
    return [{"idx": i, "name": str(i), "path": paths[k], "type": f"sentence_transformers.models.{k}"}
            for i, k in enumerate(kinds)]


# ---------------------------------------------------------------- sorted batches, input order


def test_sorted_batches_give_one_at_a_time_vectors_in_input_order(minilm, mixed):
    got = minilm.embed(mixed, batch_size=8, normalize=False)                       # [40, H], sorted batches
    alone = np.stack([minilm.embed(t, normalize=False) for t in mixed])           # each sentence by itself
    assert_forward_close(got, alone, minilm.config)
    perm = np.random.default_rng(0).permutation(len(mixed))
    again = minilm.embed([mixed[i] for i in perm], batch_size=8, normalize=False)  # another order, other batches
    assert_forward_close(again, alone[perm], minilm.config)


def test_classify_keeps_input_order(sst2, mixed):
    got = sst2.classify(mixed, batch_size=8)
    for text, (label, p) in zip(mixed, got):
        label1, p1 = sst2.classify(text)                                          # a single string: one tuple
        assert label == label1
        assert_forward_close(p, p1, sst2.config, extra_depth=2)  # pooler, classifier


def test_batches_cover_every_text_once_longest_first(minilm, mixed):
    seen, lengths = [], []
    for rows, enc in minilm.batches(mixed, batch_size=8):
        assert len(rows) <= 8 and enc.attention_mask.shape[0] == len(rows)
        n = enc.attention_mask.sum(1)
        assert n.max() == enc.attention_mask.shape[1]                           # padded to its own longest only
        np.testing.assert_array_equal(n, [len(minilm.tokenize(mixed[r]).input_ids[0]) for r in rows])
        seen += list(rows)
        lengths += list(n)
    assert sorted(seen) == list(range(len(mixed)))
    assert lengths == sorted(lengths, reverse=True)


def test_sorting_drops_the_padding_computed():
    """Tokens computed (batch x padded length) over real tokens, 2,000 SST-2 train sentences, batches of 32."""
    model = minifca.from_pretrained(minifca.default_model_path(), backend="numpy")
    texts = read_sst2(SST2_TRAIN, limit=2000)[0]
    real = sum(len(e.ids) for e in model.tokenizer.encode(texts))
    given = sum(model.tokenize(texts[i:i + 32]).attention_mask.size for i in range(0, len(texts), 32))
    computed = sum(enc.attention_mask.size for _, enc in model.batches(texts, batch_size=32))
    assert given > 2 * real                                  # the file's order: most of the work is padding
    assert computed < 1.05 * real                            # sorted: nearly none


def test_single_string_gives_a_vector(minilm):
    v = minilm.embed("one sentence")
    assert v.shape == (minilm.config.hidden_size,) and v.dtype == np.float32
    np.testing.assert_array_equal(v, minilm.embed(["one sentence"])[0])


def test_progress_bar_on_stderr(minilm, mixed, capsys):
    minilm.embed(mixed[:5], show_progress_bar=True)
    err = capsys.readouterr().err
    assert "embed:" in err and "/5 [" in err                     # the bar, counting 5 texts
    minilm.embed(mixed[:5])
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- sentence-transformers' files


def test_shipped_minilm_files_are_read(minilm):
    s = minilm.sentence
    assert (s.pooling, s.normalize, s.max_seq_length, s.unsupported) == ("mean", True, 256, ())


def test_normalize_module_honoured(minilm, mixed, minilm_path, tmp_path):
    unit = minilm.embed(mixed[:6])
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1, rtol=2 * unit.shape[1] * EPS32)  # a norm: one H-term sum
    raw = minilm.embed(mixed[:6], normalize_embeddings=False)
    assert np.abs(np.linalg.norm(raw, axis=1) - 1).min() > 0.1   # mean-pooled vectors are not unit length
    out = minilm(minilm.tokenize(mixed[:6]))
    assert_forward_close(raw, out.embeddings, minilm.config)
    assert_f32_close(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), 2, raw.shape[1])  # norm, divide
    plain = minifca.from_pretrained(variant(minilm_path, tmp_path, modules("Transformer", "Pooling")))
    assert_forward_close(plain.embed(mixed[:6]), raw, minilm.config)


def test_same_as_transformers_mean_pool_and_normalize(minilm_path, mixed):
    """What sentence-transformers' encode computes for this checkpoint, written out in torch."""
    import torch
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_path))
    tm = transformers.AutoModel.from_pretrained(str(minilm_path), attn_implementation="eager").eval()
    enc = tok(mixed[:8], padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        h = tm(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1).numpy()
    model = minifca.from_pretrained(minilm_path)
    assert_forward_close(model.embed(mixed[:8]), ref, model.config, extra_depth=2)  # pool, normalize


def test_max_seq_length_honoured(minilm_path, tmp_path):
    model = minifca.from_pretrained(variant(minilm_path, tmp_path, sentence={"max_seq_length": 8}))
    text = "a sentence that is a good deal longer than eight word pieces , to be cut"
    assert len(model.tokenize(text).input_ids[0]) > 8
    cut = model.tokenize(text, max_length=8)
    ref = model(cut).embeddings[0]
    ref = ref / np.linalg.norm(ref)
    assert_forward_close(model.embed(text), ref, model.config, extra_depth=2)
    longer = model.embed(text, max_length=12)                   # an explicit max_length wins
    assert np.abs(longer - ref).max() > 1e-3


def test_long_text_is_truncated_at_256_like_encode(minilm):
    text = " ".join(["word"] * 600)
    ref = minilm(minilm.tokenize(text, max_length=256)).embeddings[0]
    assert_forward_close(minilm.embed(text), ref / np.linalg.norm(ref), minilm.config, extra_depth=2)
    with pytest.raises(InputError, match="600|602|limit"):
        minilm.embed(text, truncation=False)


def test_cls_pooling_honoured(minilm_path, tmp_path, mixed):
    model = minifca.from_pretrained(variant(minilm_path, tmp_path, pooling={
        "word_embedding_dimension": 384, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    assert model.sentence.pooling == "cls"
    out = model(model.tokenize(mixed[:4]))
    ref = out.last_hidden_state[:, 0] / np.linalg.norm(out.last_hidden_state[:, 0], axis=1, keepdims=True)
    assert_forward_close(model.embed(mixed[:4]), ref, model.config, extra_depth=2)


@pytest.mark.parametrize("change, named", [
    ({"pooling": {"pooling_mode_max_tokens": True}}, "pooling_mode_max_tokens"),
    ({"pooling": {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True}}, "pooling_mode_cls_token"),
    ({"modules": modules("Transformer", "Pooling", "Dense", "Normalize")}, "sentence_transformers.models.Dense"),
])
def test_unimplemented_modules_refused_by_name(minilm_path, tmp_path, change, named):
    model = minifca.from_pretrained(variant(minilm_path, tmp_path, **change))
    with pytest.raises(ConfigError, match=named):
        model.embed("a sentence")
    assert model(model.tokenize("a sentence")).last_hidden_state.shape[0] == 1  # the forward still runs


def test_broken_modules_json_names_the_file(minilm_path, tmp_path):
    folder = variant(minilm_path, tmp_path)
    (folder / "modules.json").write_text("{not json")
    with pytest.raises(ConfigError, match="modules.json"):
        minifca.from_pretrained(folder)


# ---------------------------------------------------------------- encode's keyword names


def test_encode_keywords(minilm, mixed):
    a = minilm.embed(mixed[:3], batch_size=2, show_progress_bar=False, normalize_embeddings=True,
                     convert_to_numpy=True)
    np.testing.assert_array_equal(a, minilm.embed(mixed[:3], batch_size=2, normalize=True))
    listed = minilm.embed(mixed[:3], batch_size=2, convert_to_numpy=False)
    assert isinstance(listed, list) and [v.shape for v in listed] == [(384,)] * 3
    np.testing.assert_array_equal(np.stack(listed), a)
    with pytest.raises(InputError, match="torch.from_numpy"):
        minilm.embed(mixed[:3], convert_to_tensor=True)
    with pytest.raises(InputError, match="normalize_embeddings"):
        minilm.embed(mixed[:3], normalize=True, normalize_embeddings=False)
    with pytest.raises(InputError, match="batch_size"):
        minilm.embed(mixed[:3], batch_size=0)


def test_hub_download_fetches_the_sentence_files():
    from huggingface_hub.utils import filter_repo_objects

    from minifca.model import NEEDED_FILES
    repo = ["modules.json", "sentence_bert_config.json", "1_Pooling/config.json", "config.json", "model.safetensors",
            "pytorch_model.bin", "onnx/model.onnx", "README.md", "tokenizer.json"]
    got = set(filter_repo_objects(repo, allow_patterns=NEEDED_FILES))
    assert got == {"modules.json", "sentence_bert_config.json", "1_Pooling/config.json", "config.json",
                   "model.safetensors", "tokenizer.json"}


# ---------------------------------------------------------------- threads=


def numpy_blas_threads():
    """The thread counts of the BLAS libraries NumPy's products run on (threadpoolctl), not of others loaded
    later (scipy's own OpenBLAS loads when Numba first compiles a kernel, inside a limit or not)."""
    from threadpoolctl import threadpool_info
    return [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas" and "numpy" in d["filepath"]]


class Spy:
    """The numba ops with resident_params (which reference.bert_forward calls once, as each forward starts)
    wrapped to record the thread limits in force during each forward."""

    def __init__(self, ops, seen):
        self._ops, self._seen, self.threads_used = ops, seen, set()

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def resident_params(self, *a, **k):
        import numba
        blas = set(numpy_blas_threads())
        self._seen.append((numba.get_num_threads(), blas))
        self.threads_used.add(threading.get_ident())
        return self._ops.resident_params(*a, **k)


def limits_seen(model, call, threads_used=None):
    """The (Numba threads, {BLAS threads}) of every forward `call` makes; threads_used: a set to add the ids of
    the Python threads the forwards ran on to."""
    seen = []
    model.ops = Spy(model.ops, seen)
    try:
        call()
    finally:
        if threads_used is not None:
            threads_used |= model.ops.threads_used
        model.ops = model.ops._ops
    return seen


def test_threads_limit_numba_and_blas_during_the_call(minilm_path, mixed):
    import numba
    top = numba.config.NUMBA_NUM_THREADS
    blas_before = numpy_blas_threads()
    model = minifca.from_pretrained(minilm_path, threads=1)
    seen = limits_seen(model, lambda: model.embed(mixed[:6], batch_size=2))
    assert seen == [(1, {1})] * 3                                # the model's threads=1, in every forward
    n = min(2, top)
    seen = limits_seen(model, lambda: model.embed(mixed[:2], batch_size=2, threads=n))
    assert seen == [(n, {n})]                                    # the call's threads= wins over the model's
    seen = limits_seen(model, lambda: model.forward([[101, 102]], threads=1))
    assert seen == [(1, {1})]
    assert numba.get_num_threads() == top                        # put back after each call
    assert numpy_blas_threads() == blas_before


def test_embed_and_classify_run_batches_side_by_side(minilm_path, sst2, mixed):
    """With 2 threads and more than one batch, the batches run two at a time, each forward on a worker thread of
    its own with 1 Numba and 1 BLAS thread (threadlimit.side_by_side); the vectors are those of one batch at a
    time (the same rows through the same kernels: bit-identical here), in input order, and every limit is put
    back after the call."""
    import numba
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.fail("this test needs NUMBA_NUM_THREADS >= 2 (CI's machine has 2 cores)")
    blas_before = numpy_blas_threads()
    model = minifca.from_pretrained(minilm_path)
    one_by_one = np.empty((len(mixed), 384), np.float32)
    for rows, v in model.embed_batches(mixed, batch_size=3):
        one_by_one[rows] = v
    used = set()
    seen = limits_seen(model, lambda: model.embed(mixed, batch_size=3, threads=2), used)
    assert seen == [(1, {1})] * -(-len(mixed) // 3)
    assert len(used) == 2 and threading.get_ident() not in used
    assert np.array_equal(model.embed(mixed, batch_size=3, threads=2), one_by_one)
    labels = sst2.classify(mixed, batch_size=3, threads=2)
    assert [lab for lab, _ in labels] == [sst2.classify(t)[0] for t in mixed]  # input order
    assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS
    assert numpy_blas_threads() == blas_before


def test_side_by_side_keeps_order_bounds_the_work_in_flight_and_raises():
    import time

    from minifca.threadlimit import side_by_side
    live, most, lock = [0], [0], threading.Lock()

    def job(i):
        with lock:
            live[0] += 1
            most[0] = max(most[0], live[0])
        time.sleep(0.002 * ((7 * i) % 5))                            # finish out of order
        with lock:
            live[0] -= 1
        if i == 13:
            raise ValueError("job 13")
        return i * i
    results = side_by_side(job, range(13), 2)
    assert next(results) == 0                                        # a generator: later jobs still to come
    assert [0] + list(results) == [i * i for i in range(13)] and most[0] <= 2
    with pytest.raises(ValueError, match="job 13"):
        list(side_by_side(job, range(20), 2))


def test_side_by_side_runs_in_turn_while_another_thread_holds_a_limit():
    """While thread A holds a limit, B's side_by_side runs its items in turn on B's own thread and sets nothing
    (this OpenBLAS may not let a count lowered by one thread rise again from another); A's closing puts BLAS back.
    Alone, the items run on two worker threads."""
    import time

    from minifca.threadlimit import side_by_side, thread_limit
    blas = numpy_blas_threads
    before = blas()
    held, release, seen = threading.Event(), threading.Event(), {}

    def a():
        with thread_limit(1, numba=False):
            held.set()
            release.wait(10)

    def b():
        held.wait(10)
        seen["threads"] = {i for i in side_by_side(lambda _: threading.get_ident(), range(6), 2)}
        seen["me"] = threading.get_ident()
        release.set()
    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen["threads"] == {seen["me"]}
    assert blas() == before

    def slow(_):                                                     # long enough that the pool starts its second
        time.sleep(0.02)                                             # thread while the first is busy
        return threading.get_ident()
    alone = set(side_by_side(slow, range(6), 2))
    assert len(alone) == 2 and threading.get_ident() not in alone and blas() == before


def test_threads_checked(minilm_path):
    import numba
    with pytest.raises(InputError, match="threads"):
        minifca.from_pretrained(minilm_path, threads=0)
    model = minifca.from_pretrained(minilm_path)
    with pytest.raises(InputError, match="NUMBA_NUM_THREADS"):
        model.embed("a", threads=numba.config.NUMBA_NUM_THREADS + 1)
