"""minifca.distill and `minifca distill`: the loss falls, Ctrl-C + resume continue exactly, transformers loads the result."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import minifca
from minifca import FCAConfig, cli, data as data_mod, distill as distill_mod, grad
from minifca.weights import read_safetensors

from conftest import SST2_MODEL, SST2_TRAIN, model_bound, read_sst2, torch_reference, write_random_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer BERT with the SST-2 fine-tune's tokenizer."""
    folder = write_random_checkpoint(tmp_path_factory.mktemp("tiny"), seed=3, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(SST2_MODEL / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def train_tsv(tmp_path_factory):
    texts, labels = read_sst2(SST2_TRAIN, limit=24)
    path = tmp_path_factory.mktemp("data") / "train.tsv"
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in zip(texts, labels)))
    return path


def data_loss(folder, tsv, fca, teacher):
    """The training loss (cross-entropy + KL to the teacher, no dropout) of a checkpoint on the whole file."""
    m = minifca.from_pretrained(folder, backend="numpy")
    teacher = minifca.from_pretrained(teacher, backend="numpy")
    d = data_mod.read_training_data(tsv, m.config)
    enc = m.tokenize(d.texts)
    out, _ = grad.forward(m.params, m.config, enc.input_ids, enc.attention_mask, enc.token_type_ids, fca=fca)
    t = teacher(enc).logits
    return grad.cross_entropy(out["logits"], d.labels)[0] + grad.kl_to_teacher(out["logits"], t)[0]


KW = {"batch_size": 8, "lr": 3e-3, "warmup": 1, "dropout": 0.1, "seed": 1, "max_length": 32}


def test_without_a_bar_the_log_gets_progress_lines(tiny, train_tsv, tmp_path):
    lines = []
    distill_mod.distill(tiny, train_tsv, tmp_path / "out", fca=FCAConfig(keep=[0.6, 0.4]), steps=3, progress_bar=False,
                        log_every=0, log=lines.append, **KW)
    steps = [s for s in lines if s.startswith("step ")]
    assert [s.split(":")[0] for s in steps] == ["step 1/3", "step 2/3", "step 3/3"], lines
    assert all("examples/s" in s and "ETA" in s and "loss" in s for s in steps)


def test_loss_falls_and_transformers_loads_the_result(tiny, train_tsv, tmp_path):
    fca = FCAConfig(keep=[0.6, 0.4], aggregate="weighted")
    before = data_loss(tiny, train_tsv, fca, tiny)
    r = distill_mod.distill(tiny, train_tsv, tmp_path / "out", fca=fca, steps=12, progress_bar=False, log=lambda s: None,
                            **KW)
    assert r["steps"] == 12 and len(r["history"]) == 12
    after = data_loss(tmp_path / "out", train_tsv, fca, tiny)
    assert after < 0.9 * before, (before, after)
    out = tmp_path / "out"
    assert FCAConfig.load(out / "fca.json") == fca
    src_names = set(read_safetensors(tiny / "model.safetensors"))
    assert set(read_safetensors(out / "model.safetensors")) == src_names          # the source's tensor names
    ours = minifca.from_pretrained(out, backend="numpy")
    enc = ours.tokenize(["a gripping film .", "dull and long ."])
    theirs = torch_reference(out)                                                  # transformers reads the folder
    import torch
    with torch.no_grad():
        logits = theirs(input_ids=torch.from_numpy(enc.input_ids), attention_mask=torch.from_numpy(enc.attention_mask),
                        token_type_ids=torch.from_numpy(enc.token_type_ids)).logits.numpy()
    want = ours(enc).logits
    assert np.abs(logits - want).max() <= model_bound(want, ours.config)
    trained = dict(grad.leaves(grad.trainable(ours.params)))
    source = dict(grad.leaves(grad.trainable(minifca.from_pretrained(tiny, backend="numpy").params)))
    assert all(trained[k].shape == source[k].shape for k in source)
    unchanged = [k for k in source if np.array_equal(trained[k], source[k])]
    assert not unchanged, f"not trained: {unchanged}"                               # every tensor was updated


def test_interrupt_and_resume_continue_exactly(tiny, train_tsv, tmp_path, monkeypatch):
    fca = FCAConfig(keep=0.5, aggregate="clusters", clusters=2)
    kw = dict(KW, accumulate=2, steps=4, progress_bar=False, log=lambda s: None)
    distill_mod.distill(tiny, train_tsv, tmp_path / "straight", fca=fca, **kw)
    calls, real = [0], distill_mod.train_step

    def interrupted(*a, **k):                                                      # Ctrl-C in the 6th micro-batch
        calls[0] += 1
        if calls[0] == 6:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(distill_mod, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        distill_mod.distill(tiny, train_tsv, tmp_path / "resumed", fca=fca, **kw)
    monkeypatch.setattr(distill_mod, "train_step", real)
    assert distill_mod.load_state(tmp_path / "resumed")["t"][0] == 2                # steps 1-2 saved, 3 lost
    r = distill_mod.distill(tiny, train_tsv, tmp_path / "resumed", resume=True, **kw)
    assert r["steps"] == 4 and r["steps_run"] == 2
    a, b = (read_safetensors(tmp_path / d / "model.safetensors") for d in ("straight", "resumed"))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)              # same steps, same bits
    sa, sb = (distill_mod.load_state(tmp_path / d) for d in ("straight", "resumed"))
    for name in sa:
        np.testing.assert_array_equal(sa[name], sb[name], err_msg=name)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A random 2-layer BERT without a head (a sentence encoder), with the SST-2 fine-tune's tokenizer."""
    folder = write_random_checkpoint(tmp_path_factory.mktemp("encoder"), seed=4, head=None, hidden_size=32,
                                     num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=64)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(SST2_MODEL / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def sentences(tmp_path_factory):
    texts, _ = read_sst2(SST2_TRAIN, limit=24)
    path = tmp_path_factory.mktemp("text") / "sentences.txt"
    path.write_text("\n".join(texts) + "\n")
    return path


def test_unlabelled_text_trains_an_encoders_embeddings(encoder, sentences, tmp_path):
    d = data_mod.read_training_data(sentences)
    assert d.labels is None and len(d.texts) == 24
    r = distill_mod.distill(encoder, sentences, tmp_path / "out", target_flops=0.7, steps=3, calibration_samples=16,
                            progress_bar=False, log=lambda s: None, **KW)
    assert r["calibration"]["objective"] == "embeddings" and r["calibration"]["flops_ratio"] <= 0.7
    assert all(np.isfinite(h["loss"]) and 0 <= h["loss"] <= 2 for h in r["history"])  # 1 - cos lies in [0, 2]
    saved = json.loads((tmp_path / "out" / "fca.json").read_text())
    assert saved["keep"] == r["fca"]["keep"] and saved["meta"]["labelled"] is False
    assert saved["meta"]["target"] == "embeddings"


def test_unlabelled_text_trains_a_classifier_on_the_teachers_logits(tiny, sentences, tmp_path, monkeypatch):
    ce_calls, kls = [], []
    real_ce, real_kl = grad.cross_entropy, grad.kl_to_teacher
    monkeypatch.setattr(grad, "cross_entropy", lambda *a: ce_calls.append(1) or real_ce(*a))
    monkeypatch.setattr(grad, "kl_to_teacher", lambda *a: kls.append(real_kl(*a)) or kls[-1])
    r = distill_mod.distill(tiny, sentences, tmp_path / "out", fca=FCAConfig(keep=[0.6, 0.4]), steps=3, kl=1.0,
                            progress_bar=False, log=lambda s: None, **KW)
    assert not ce_calls                                              # no labels: no cross-entropy
    assert [h["loss"] for h in r["history"]] == [v for v, _ in kls]  # the loss is the KL to the teacher alone
    assert json.loads((tmp_path / "out" / "fca.json").read_text())["meta"]["target"] == "logits"


def test_cli_distill(tiny, train_tsv, tmp_path, capsys):
    schedule = tmp_path / "s.json"
    FCAConfig(keep=0.5).save(schedule)
    rc = cli.main(["distill", "--model", str(tiny), "--data", str(train_tsv), "--out", str(tmp_path / "o"),
                   "--fca-schedule", str(schedule), "--steps", "2", "--batch-size", "8", "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    assert r["steps"] == 2 and np.isfinite(r["final_loss"])
    rc = cli.main(["distill", "--model", str(tiny), "--data", str(train_tsv), "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("minifca: error:") and "--target-flops" in err and "\n" not in err
    rc = cli.main(["distill", "--model", str(tiny), "--data", str(tmp_path / "missing.tsv"), "--out",
                   str(tmp_path / "q"), "--fca-schedule", str(schedule)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "missing.tsv" in err and "\n" not in err
