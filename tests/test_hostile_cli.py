"""Hostile command lines: flags, files, data sets, output folders and bytes that are not UTF-8. Each gives
exit status 2 with one `minifca: error:` line naming the flag, file or field, and no traceback.

Most run `minifca.cli.main` in-process (what the console script calls); a few real subprocesses check
what only a process shows (argv bytes that are not UTF-8, stdin, the exit status and stderr as a shell
sees them).
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from minifca import cli

from conftest import ROOT, SST2_DEV, write_random_checkpoint

SMALL = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 40, "vocab_size": 90,
             "max_position_embeddings": 24}


def fails(capsys, *argv, match=()):
    """cli.main(argv) exits 2 with one error line naming each of `match`, and no traceback."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:                                          # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, (code, out[-500:], err[-500:])
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and ("minifca: error:" in lines[-1] or "error:" in lines[-1]), err
    for m in [match] if isinstance(match, str) else match:
        assert m in err, f"{m!r} not in {err!r}"
    return err


def ok(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    return out


# ---------------------------------------------------------------- model and FCA flags


@pytest.mark.parametrize("argv, match", [
    (["--model", ""], ["empty"]),
    (["--model", "   "], ["empty"]),
    (["--model", "a b c"], ["'a b c'", "not a hub id"]),
    (["--model", "no/such/folder"], ["no/such/folder", "no such directory"]),
    (["--fca-keep", "abc"], ["--fca-keep", "'abc'"]),
    (["--fca-keep", "nan"], ["keep"]),
    (["--fca-keep", "0"], ["keep"]),
    (["--fca-keep", "0.9,1.2"], ["keep"]),
    (["--fca-keep", "0.5", "--fca-score", "nope"], ["score", "'nope'"]),
    (["--fca-keep", "0.5", "--fca-aggregate", "nope"], ["aggregate", "'nope'"]),
    (["--fca-keep", "0.5", "--fca-clusters", "0"], ["clusters"]),
    (["--fca-keep", "0.5", "--fca-clusters", "3"], ["clusters=3", "weighted"]),
    (["--fca-keep", "0.5", "--fca-start-layer", "99"], ["start_layer"]),
    (["--max-length", "0"], ["max_length"]),
    (["--max-length", "abc"], ["--max-length", "invalid int"]),
    (["--backend", "tpu"], ["--backend", "tpu"]),
])
def test_run_flag(capsys, sst2_path, argv, match):
    model = [] if "--model" in argv else ["--model", sst2_path]
    fails(capsys, "run", *model, *argv, "a text", match=match)


@pytest.mark.parametrize("content, match", [
    (b'{"keep": 0.5, "score": ["attention_received"]}', ["FCA score", "['attention_received']"]),
    (b'{"keep": 0.5, "aggregate": {"name": "weighted"}}', ["FCA aggregate"]),
    (b'{"keep": "half"}', ["keep", "'half'"]),
    (b'{"keep": 0.5, "turbo": true}', ["turbo"]),
    (b'{"keep": 0.5, "score": "\xff"}', ["not a text file"]),
    (b"[0.5]", ["JSON object"]),
    (b"", ["not valid JSON"]),
])
def test_bad_schedule_file(capsys, sst2_path, tmp_path, content, match):
    f = tmp_path / "s.json"
    f.write_bytes(content)
    fails(capsys, "run", "--model", sst2_path, "--fca-schedule", f, "a text", match=[str(f), *match])


def test_schedule_that_is_a_folder_or_missing(capsys, sst2_path, tmp_path):
    fails(capsys, "run", "--model", sst2_path, "--fca-schedule", tmp_path, "x", match=[str(tmp_path), "not a file"])
    fails(capsys, "run", "--model", sst2_path, "--fca-schedule", tmp_path / "no.json", "x", match=["not found"])


def test_run_argument_not_utf8_in_process(capsys, sst2_path):
    """argv bytes that are not UTF-8 reach Python as lone surrogates (surrogateescape)."""
    fails(capsys, "run", "--model", sst2_path, "fine", "caf\udce9", match=["text argument 2", "not UTF-8", "0xe9"])


def test_stdin_not_utf8_in_process(capsys, sst2_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"good line\ncaf\xe9 latin-1\n")))
    fails(capsys, "run", "--model", sst2_path, match=["stdin", "not UTF-8", "line 2"])


def test_stdin_empty(capsys, sst2_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\n  \n")))
    fails(capsys, "run", "--model", sst2_path, match=["empty input", "stdin"])


def test_stdin_with_bom_and_crlf(capsys, sst2_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("\ufeffa fine film\r\na bad one\r\n".encode())))
    res = json.loads(ok(capsys, "run", "--model", sst2_path, "--json"))
    assert [p["text"] for p in res["predictions"]] == ["a fine film", "a bad one"]


@pytest.fixture(scope="module")
def token_model(tmp_path_factory):
    folder = write_random_checkpoint(tmp_path_factory.mktemp("tok") / "m", head="token", num_labels=3, **SMALL)
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\nb" + "\n")
    return folder


def test_token_classifier_with_fca(capsys, token_model):
    fails(capsys, "run", "--model", token_model, "--fca-keep", "0.5", "a b a b", match=["BertForTokenClassification",
                                                                                      "FCA merges tokens"])


def test_explain_text_not_utf8(capsys, sst2_path):
    fails(capsys, "explain", "--model", sst2_path, "bad \udcff byte", match=["text argument 1", "not UTF-8"])


# ---------------------------------------------------------------- data files


def _tsv(tmp_path, text: bytes | str, name="d.tsv"):
    f = tmp_path / name
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    return f


@pytest.mark.parametrize("content, match", [
    ("sentence\tlabel\na fine film\t1.5\n", ["label '1.5'", "integer class ids"]),
    ("sentence\tlabel\na fine film\tpositive\n", ["label 'positive'"]),
    ("sentence\tlabel\na fine film\t7\n", ["label 7", "2 classes"]),
    ("sentence\tlabel\na fine film\t1\textra\n", [":2:", "3 tab-separated fields"]),
    ("text\tscore\na fine film\t1\n", ["no label column"]),
    ("label\n1\n", ["no text column"]),
    (b"sentence\tlabel\ncaf\xe9\t1\n", ["not UTF-8"]),
    ("", ["empty data file"]),
    ("sentence\tlabel\na\t-1\nb\t-1\n", ["every label is -1"]),
])
def test_bad_data_file(capsys, sst2_path, tmp_path, content, match):
    f = _tsv(tmp_path, content)
    fails(capsys, "eval", "--model", sst2_path, "--data", f, match=[str(f), *match])


@pytest.mark.parametrize("data, match", [("", ["data", "''"]), ("missing.tsv", ["missing.tsv", "not found"]),
                                         ("./nope", ["nope"])])
def test_bad_data_flag(capsys, sst2_path, tmp_path, monkeypatch, data, match):
    monkeypatch.chdir(tmp_path)                                      # "" must not mean "this folder"
    fails(capsys, "eval", "--model", sst2_path, "--data", data, match=match)


@pytest.mark.parametrize("argv, match", [(["--batch-size", "0"], ["--batch-size", "must be >= 1"]),
                                         (["--limit", "-3"], ["--limit"]), (["--pad-to", "x"], ["--pad-to"])])
def test_bad_eval_flags(capsys, sst2_path, argv, match):
    fails(capsys, "eval", "--model", sst2_path, "--data", SST2_DEV, *argv, match=match)


def test_tsv_with_bom_and_crlf_reads_as_plain(capsys, sst2_path, tmp_path):
    lines = SST2_DEV.read_text(encoding="utf-8").splitlines()[:9]
    plain = _tsv(tmp_path, "\n".join(lines) + "\n", "plain.tsv")
    windows = _tsv(tmp_path, ("\ufeff" + "\r\n".join(lines) + "\r\n").encode(), "windows.tsv")
    a = json.loads(ok(capsys, "eval", "--model", sst2_path, "--data", plain, "--json"))
    b = json.loads(ok(capsys, "eval", "--model", sst2_path, "--data", windows, "--json"))
    assert a["examples"] == b["examples"] == 8 and a["accuracy"] == b["accuracy"] and a["flops"] == b["flops"]


def test_eval_cache_line_without_logits_is_recomputed(capsys, sst2_path, tmp_path):
    out = tmp_path / "out"
    argv = ["eval", "--model", sst2_path, "--data", SST2_DEV, "--limit", "12", "--batch-size", "4", "--out", out,
            "--json"]
    first = json.loads(ok(capsys, *argv))
    (cache,) = out.glob("*.jsonl")
    lines = cache.read_text().splitlines()
    broken = []
    for i, line in enumerate(lines):
        r = json.loads(line)
        if i == 0:
            r.pop("logits")                                          # the line the issue found (KeyError)
        elif i == 1:
            r["logits"] = [[0.0]]                                    # wrong shape
        elif i == 2:
            r = ["not", "a", "record"]
        broken.append(json.dumps(r))
    cache.write_text("\n".join(broken) + "\n")
    again = json.loads(ok(capsys, *argv))
    assert again["accuracy"] == first["accuracy"] and again["flops"] == first["flops"]


# ---------------------------------------------------------------- ablate output folders


def test_ablate_folder_of_another_configuration(capsys, sst2_path, tmp_path):
    out = tmp_path / "abl"
    base = ["ablate", "--model", sst2_path, "--data", SST2_DEV, "--scores", "attention_received", "--aggregates",
            "drop", "--keep", "0.5", "--out", out]
    ok(capsys, *base, "--limit", "8")
    assert json.loads((out / "run.json").read_text())["examples"] == 8
    ok(capsys, *base, "--limit", "8")                                # the same run: resumes (nothing to do)
    rows = (out / "results.csv").read_text().splitlines()
    fails(capsys, *base, "--limit", "6", match=[str(out), "another ablate run", "examples: 8 there, 6 now"])
    fails(capsys, *base, "--limit", "8", "--pad-to", "32", match=["pad_to: 64 there, 32 now"])
    assert (out / "results.csv").read_text().splitlines() == rows    # nothing was mixed in


def test_ablate_folder_from_before_run_json(capsys, sst2_path, tmp_path):
    """A folder written before run.json existed: its full-model row's key tells whether it is the same run."""
    out = tmp_path / "abl"
    base = ["ablate", "--model", sst2_path, "--data", SST2_DEV, "--scores", "random", "--aggregates", "drop",
            "--keep", "0.5", "--out", out]
    ok(capsys, *base, "--limit", "8")
    (out / "run.json").unlink()
    fails(capsys, *base, "--limit", "5", match=["another ablate run"])
    ok(capsys, *base, "--limit", "8")
    assert (out / "run.json").exists()


@pytest.mark.parametrize("argv, match", [(["--keep", "abc"], ["--keep", "'abc'"]), (["--scores", "nope"], ["'nope'"]),
                                         (["--aggregates", "mean", "--keep", "1.5"], ["keep"])])
def test_bad_ablate_flags(capsys, sst2_path, tmp_path, argv, match):
    fails(capsys, "ablate", "--model", sst2_path, "--data", SST2_DEV, "--limit", "4", "--out", tmp_path / "o", *argv,
          match=match)


def test_ablate_out_is_a_file(capsys, sst2_path, tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    fails(capsys, "ablate", "--model", sst2_path, "--data", SST2_DEV, "--limit", "4", "--out", f, match=[str(f)])


# ---------------------------------------------------------------- real processes


def _minifca(*argv, stdin=b""):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "minifca.cli", *argv], input=stdin, capture_output=True, env=env,
                          cwd=ROOT, timeout=300, check=False)


def test_process_argv_not_utf8(sst2_path):
    r = _minifca(b"run", b"--model", str(sst2_path).encode(), b"caf\xe9")
    assert r.returncode == 2 and b"Traceback" not in r.stderr
    assert r.stderr.decode().strip().splitlines()[-1].startswith("minifca: error: text argument 1 is not UTF-8")


def test_process_stdin_not_utf8(sst2_path):
    r = _minifca("run", "--model", str(sst2_path), stdin=b"\xff\xfe\x00t\x00e\x00x\x00t\x00\n")   # UTF-16
    assert r.returncode == 2 and b"Traceback" not in r.stderr and b"stdin: not UTF-8" in r.stderr


def test_process_empty_model_and_list_valued_rule(sst2_path, tmp_path):
    r = _minifca("run", "--model", "", "text")
    assert r.returncode == 2 and b"Traceback" not in r.stderr and b"empty" in r.stderr
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"keep": 0.5, "aggregate": ["weighted", "drop"]}))
    r = _minifca("run", "--model", str(sst2_path), "--fca-schedule", str(f), "text")
    assert r.returncode == 2 and b"Traceback" not in r.stderr and b"FCA aggregate must be a rule's name" in r.stderr


@pytest.mark.parametrize("suffix", [".tsv", ".txt"])
def test_embed_input_with_bom_and_crlf(capsys, minilm_path, tmp_path, suffix):
    import numpy as np
    lines = (["sentence"] if suffix == ".tsv" else []) + ["a first text", "a second one"]
    plain = _tsv(tmp_path, "\n".join(lines) + "\n", "plain" + suffix)
    windows = _tsv(tmp_path, ("\ufeff" + "\r\n".join(lines) + "\r\n").encode(), "windows" + suffix)
    ok(capsys, "embed", "--model", minilm_path, plain, "-o", tmp_path / "a.npy")
    ok(capsys, "embed", "--model", minilm_path, windows, "-o", tmp_path / "b.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


def test_token_classifier_run_labels_every_token(capsys, token_model):
    """A BertForTokenClassification checkpoint is run as one (its per-token head used), not as a bare encoder."""

    import minifca
    res = json.loads(ok(capsys, "run", "--model", token_model, "--backend", "numpy", "a b a", "b", "--json"))
    model = minifca.from_pretrained(token_model, backend="numpy")
    enc = model.tokenize(["a b a", "b"])
    want = model(enc).logits.argmax(-1)
    labels = model.config.id2label
    for r, toks, row in zip(res["tags"], enc.tokens, want):
        assert r["tokens"] == [[t, labels[int(c)]] for t, c in zip(toks, row)]
    assert [len(r["tokens"]) for r in res["tags"]] == [5, 3]          # [CLS] a b a [SEP], [CLS] b [SEP]
    text = ok(capsys, "run", "--model", token_model, "--backend", "numpy", "a b")
    assert "[CLS]/" in text and "a/" in text
