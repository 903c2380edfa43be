"""Sentence similarity (STS Benchmark): reading the files, Spearman with ties, cosines against transformers,
`minifca eval` on an STS file, and `calibrate` on unlabelled text for a checkpoint without a classifier."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, strategies as st

import minifca
from minifca import cli, similarity
from minifca.data import looks_like_sts, read_sts
from minifca.errors import InputError

from conftest import SHARED, SST2_MODEL, SST2_TRAIN, assert_f32_close, read_sst2, write_random_checkpoint

STS_DEV = SHARED / "data" / "stsb" / "sts-dev.csv"


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), min_size=3, max_size=60))
def test_spearman_equals_scipy_with_ties(pairs):
    a, b = (np.array(x, np.float64) for x in zip(*pairs))
    want = scipy.stats.spearmanr(a, b).statistic
    got = similarity.spearman(a, b)
    if np.isnan(want):                                               # a constant side: no correlation defined
        assert np.isnan(got)
    else:
        assert abs(got - want) <= 1e-12                              # both float64 Pearson of the same ranks
    np.testing.assert_array_equal(similarity.ranks(a), scipy.stats.rankdata(a))


def test_read_sts_as_distributed(tmp_path):
    path = tmp_path / "sts.csv"
    path.write_text("main-captions\tMSRvid\t2012test\t0001\t5.000\tA man.\tA man!\n"
                    "main-news\theadlines\t2013\t0002\t1.25\tOne.\tTwo.\tsrc1\tsrc2\n")   # the 9-column lines
    d = read_sts(path)
    assert d.texts == ["A man.", "One."] and d.pairs == ["A man!", "Two."]
    np.testing.assert_array_equal(d.scores, [5.0, 1.25])
    assert looks_like_sts(path) and not looks_like_sts(SST2_TRAIN) and not looks_like_sts(tmp_path / "none.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("a\tb\tc\td\t4.0\tx\ty\na\tb\tc\td\tfive\tx\ty\n")
    with pytest.raises(InputError, match=r"bad.csv:2: not an STS line"):
        read_sts(bad)


def test_cosines_match_transformers_and_fca_changes_them(minilm, minilm_path):
    import torch
    import transformers
    data = read_sts(STS_DEV)
    data.texts, data.pairs, data.scores = data.texts[:12], data.pairs[:12], data.scores[:12]
    a, b, flops, full = similarity.pair_embeddings(minilm, data)
    assert flops == full                                             # no FCA: the full model's FLOPs
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_path))
    ref = transformers.AutoModel.from_pretrained(str(minilm_path), attn_implementation="eager").eval()

    def mean_pooled(texts):
        enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            h = ref(**enc).last_hidden_state
        m = enc["attention_mask"][..., None].float()
        return ((h * m).sum(1) / m.sum(1)).numpy().astype(np.float64)

    want = similarity.cosines(mean_pooled(data.texts), mean_pooled(data.pairs))
    got = similarity.cosines(a, b)
    # cosines are O(1); the embeddings carry the whole model's float32 error (6 layers, widths up to 1536)
    assert_f32_close(got, want, depth=minilm.config.num_hidden_layers, width=minilm.config.intermediate_size,
                     what="cosine similarities")
    r = similarity.evaluate_similarity(minilm, data, minifca.FCAConfig(keep=0.5))
    assert r["flops_ratio"] < 0.8 and r["pairs"] == 12
    assert r["spearman_full"] == pytest.approx(similarity.spearman(got, data.scores), abs=1e-12)
    assert 0 < r["cosine_to_full"] < 1                                # FCA moved the embeddings, not to nothing


def test_cli_eval_on_an_sts_file(minilm_path, tmp_path, capsys):
    small = tmp_path / "sts-dev.csv"
    small.write_text("\n".join(STS_DEV.read_text(encoding="utf-8").splitlines()[:40]) + "\n")
    assert cli.main(["eval", "--model", str(minilm_path), "--data", str(small), "--fca-keep", "0.5", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["pairs"] == 40 and -1 <= r["spearman"] <= 1 and -1 <= r["spearman_full"] <= 1
    assert 0 < r["flops_ratio"] < 1
    assert cli.main(["eval", "--model", str(minilm_path), "--data", str(small)]) == 0
    out = capsys.readouterr().out
    assert "Spearman" in out and "100.0% of the full model" in out
    assert cli.main(["eval", "--model", str(minilm_path), "--data", str(small), "--limit", "5"]) == 2
    assert "no --out, --cluster or --limit" in capsys.readouterr().err


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A random 3-layer BERT without a classifier head (a sentence encoder), with the SST-2 fine-tune's tokenizer."""
    folder = write_random_checkpoint(tmp_path_factory.mktemp("enc"), seed=5, head=None, hidden_size=32,
                                     num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(SST2_MODEL / name, folder / name)
    return folder


def test_calibrate_on_unlabelled_text_for_a_sentence_encoder(encoder, tmp_path, capsys):
    texts, _ = read_sst2(SST2_TRAIN, limit=200)
    path = tmp_path / "sentences.txt"
    path.write_text("\n".join(texts) + "\n")
    out = tmp_path / "s.json"
    rc = cli.main(["calibrate", "--model", str(encoder), "--data", str(path), "--target-flops", "0.7",
                   "--samples", "32", "--descent-samples", "0", "--refine", "0", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert "mean cosine to the full model's embeddings" in capsys.readouterr().out
    s = json.loads(out.read_text())
    assert s["meta"]["objective"] == "embeddings" and s["meta"]["sample_flops_ratio"] <= 0.7
    assert 0 < s["meta"]["sample_agreement"] <= 1 + 1e-9                 # a mean cosine
    rc = cli.main(["calibrate", "--model", str(encoder), "--data", str(path), "--target-flops", "0.7",
                   "--pool", "64", "--out", str(out)])
    assert rc == 2 and "no classifier head" in capsys.readouterr().err


def test_the_progress_bar_counts_every_sentence_of_every_pass(minilm, monkeypatch):
    data = read_sts(STS_DEV)
    data.texts, data.pairs, data.scores = data.texts[:8], data.pairs[:8], data.scores[:8]

    class Bar:                                                       # what progress() returns, counting
        def __init__(self, total, desc, enabled):
            self.total, self.enabled, self.n = total, enabled, 0
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return False
        def update(self, k):
            self.n += k

    bars = []
    monkeypatch.setattr(similarity, "progress_bar", lambda *a: bars.append(Bar(*a)) or bars[-1])
    similarity.evaluate_similarity(minilm, data, minifca.FCAConfig(keep=0.5), progress=True)
    assert bars[0].total == bars[0].n == 32                          # 8 pairs, 2 sentences each, FCA + full pass
    assert bars[0].enabled is None                                   # a bar on a terminal, none in a log
