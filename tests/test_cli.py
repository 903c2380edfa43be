"""The command line: run (classifier and encoder checkpoints), demo, --json, --help, and errors as one line."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minifca
from minifca import cli
from minifca.commands import demo

POS, NEG = "a wonderful, moving and beautifully acted film .", "a dull , tedious and badly written mess ."


def run_cli(capsys, *argv):
    """minifca.cli.main(argv) in-process; returns (exit code, stdout, stderr)."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv):
    code, out, err = run_cli(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def subcommands():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sorted(sub.choices)


# ---------------------------------------------------------------- run


def test_run_classifier_json(capsys, sst2_path):
    res = run_json(capsys, "run", "--model", sst2_path, POS, NEG)
    assert [p["text"] for p in res["predictions"]] == [POS, NEG]
    for p in res["predictions"]:
        assert set(p) == {"text", "label", "probabilities"}
        assert abs(sum(p["probabilities"].values()) - 1) < 1e-9
        assert p["label"] == max(p["probabilities"], key=p["probabilities"].get)
    assert [p["label"] for p in res["predictions"]] == ["LABEL_1", "LABEL_0"]       # SST-2: 1 = positive
    assert res["flops"] == res["flops_full"] > 0 and res["fca"] is None
    probs = minifca.from_pretrained(sst2_path).classify([POS, NEG])
    for p, (_, q) in zip(res["predictions"], probs):
        np.testing.assert_allclose(list(p["probabilities"].values()), q, atol=1e-6)


def test_run_classifier_text(capsys, sst2_path):
    code, out, err = run_cli(capsys, "run", "--model", sst2_path, "--backend", "numpy", POS, NEG)
    assert code == 0, err
    lines = out.splitlines()
    assert "LABEL_1" in lines[0] and POS in lines[0] and "LABEL_0" in lines[1] and NEG in lines[1]
    assert "FLOPs" in lines[-1]


def test_run_encoder_json(capsys, minilm_path):
    texts = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell today."]
    res = run_json(capsys, "run", "--model", minilm_path, *texts)
    assert "predictions" not in res
    emb = minifca.from_pretrained(minilm_path).embed(texts, normalize=False)   # run prints the mean-pooled norm
    np.testing.assert_allclose([e["norm"] for e in res["embeddings"]], np.linalg.norm(emb, axis=1), rtol=1e-5)
    sim = np.array(res["similarity"])
    assert sim.shape == (3, 3)
    np.testing.assert_allclose(np.diag(sim), 1, atol=1e-5)
    np.testing.assert_allclose(sim, sim.T)
    assert sim[0, 1] > sim[0, 2] + 0.3                                  # paraphrases are closer


def test_run_encoder_text_and_default_model(capsys):
    code, out, err = run_cli(capsys, "run", "one sentence .", "another sentence .")   # the embedded default
    assert code == 0, err
    assert "norm" in out and "cosine similarity" in out


def test_run_reads_stdin(capsys, monkeypatch, sst2_path):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{POS}\n\n{NEG}\n"))
    res = run_json(capsys, "run", "--model", sst2_path)
    assert [p["text"] for p in res["predictions"]] == [POS, NEG]


def test_run_with_empty_stdin_is_an_error_line(capsys, monkeypatch, sst2_path):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    code, out, err = run_cli(capsys, "run", "--model", sst2_path)
    assert code == 2 and out == "" and err.count("\n") == 1 and "empty" in err


def test_run_with_fca_costs_fewer_flops(capsys, sst2_path):
    res = run_json(capsys, "run", "--model", sst2_path, "--fca-keep", "0.5", POS + " " + NEG)
    assert res["fca"]["keep"] == 0.5 and res["flops"] < res["flops_full"]


def test_run_too_long_unless_max_length(capsys, sst2_path, minilm_path):
    long = "word " * 600
    code, out, err = run_cli(capsys, "run", "--model", sst2_path, long)           # 602 tokens > 512 positions
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("minifca: error:") and "truncat" in err
    res = run_json(capsys, "run", "--model", sst2_path, "--max-length", "32", long)
    assert len(res["predictions"]) == 1
    res = run_json(capsys, "run", "--model", minilm_path, long)   # sentence_bert_config.json: cut at 256, as encode does
    cut = run_json(capsys, "run", "--model", minilm_path, "--max-length", "256", long)
    assert res["flops"] == cut["flops"] and len(res["embeddings"]) == 1


# ---------------------------------------------------------------- demo


def test_demo_json(capsys):
    res = run_json(capsys, "demo", "--backend", "numpy")
    for key in ("model", "backend", "fca", "full", "fca_run", "flops_ratio", "time_ratio", "picture"):
        assert key in res, key
    assert res["model"] == str(minifca.default_model_path())
    assert len(res["full"]["embeddings"]) == len(demo.DEMO_SENTENCES)
    assert 0 < res["flops_ratio"] < 1 and res["fca"]["keep"] == demo.DEMO_FCA_KEEP
    assert res["picture"]["text"] == demo.DEMO_SENTENCES[0] and res["picture"]["layers"]


def test_demo_on_a_classifier(capsys, sst2_path):
    code, out, err = run_cli(capsys, "demo", "--model", sst2_path, "--backend", "numpy", POS, NEG)
    assert code == 0, err
    assert "predictions, full model vs FCA" in out and "FLOPs" in out and POS in out


# ---------------------------------------------------------------- help and errors


@pytest.mark.parametrize("command", [None, *subcommands()])
def test_help_of_every_subcommand(capsys, command):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"] if command else ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: minifca") and (command or "COMMAND") in out


def test_subcommands_include_run_and_demo():
    assert {"run", "demo", "explain"} <= set(subcommands())


def test_no_command_prints_help(capsys):
    code, out, _ = run_cli(capsys)
    assert code == 2 and "usage: minifca" in out


def test_bad_model_path_in_process(capsys, tmp_path):
    missing = tmp_path / "nowhere"
    code, out, err = run_cli(capsys, "run", "--model", missing, "text")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("minifca: error:") and str(missing) in err


def test_bad_model_path_console_script(tmp_path):
    """The installed `minifca` command: non-zero exit, one line on stderr, no traceback."""
    exe = Path(sys.executable).with_name("minifca")
    assert exe.is_file(), f"console script missing at {exe} (pip install -e .)"
    missing = tmp_path / "nowhere"
    r = subprocess.run([str(exe), "run", "--model", str(missing), "text"], capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode != 0 and r.stdout == ""
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and str(missing) in r.stderr


def test_bad_flag_value_is_an_error_line(capsys, sst2_path):
    code, _, err = run_cli(capsys, "run", "--model", sst2_path, "--fca-keep", "lots", "text")
    assert code == 2 and err.startswith("minifca: error:") and "--fca-keep" in err


# ---------------------------------------------------------------- run --batch-size, steady-state times


def test_run_in_batches_keeps_input_order(capsys, sst2_path):
    from conftest import SST2_TRAIN, model_bound, read_sst2
    texts = read_sst2(SST2_TRAIN, limit=8)[0]
    one = run_json(capsys, "run", "--model", sst2_path, "--batch-size", "8", *texts)
    three = run_json(capsys, "run", "--model", sst2_path, "--batch-size", "3", *texts)
    assert (one["batches"], three["batches"]) == (1, 3)
    assert [p["text"] for p in three["predictions"]] == texts
    a = np.array([list(p["probabilities"].values()) for p in one["predictions"]])
    b = np.array([list(p["probabilities"].values()) for p in three["predictions"]])
    cfg = minifca.BertConfig.from_json(Path(sst2_path) / "config.json")
    assert np.abs(a - b).max() <= model_bound(a, cfg, extra_depth=2)      # + pooler and classifier
    assert three["flops"] == one["flops"]                                  # the same real tokens, counted once
    assert "one pass over 3 batches" in three["timed"] and "median of 3 forwards" in one["timed"]


def test_run_times_the_steady_state(monkeypatch, minilm_path):
    """The first forward (Numba's compile or cache load) is not in the time printed."""
    import time

    from minifca.commands.run import run_texts
    model = minifca.from_pretrained(minilm_path, backend="numpy")
    real, calls, clock = model.forward, [], [0.0]                     # a virtual clock: no real time measured

    def forward(*a, **k):
        calls.append(1)
        clock[0] += 1.0 if len(calls) == 1 else 0.01                   # a slow first call, then steady 10 ms
        return real(*a, **k)
    monkeypatch.setattr(model, "forward", forward)
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    res = run_texts(model, ["one text", "two texts"], None, repeats=3)
    assert len(calls) == 4 and res["seconds"] == pytest.approx(0.01)  # warm-up + 3 timed; the 1 s left out
    assert "median of 3 forwards" in res["timed"] and "warm-up" in res["timed"]


def test_run_many_texts_skips_the_similarity_matrix(capsys, monkeypatch):
    from minifca.commands import run
    monkeypatch.setattr(run, "MAX_SIMILARITY", 2)
    res = run_json(capsys, "run", "--backend", "numpy", "one", "two", "three")
    assert res["similarity"] is None and len(res["embeddings"]) == 3


def test_demo_names_what_it_timed(capsys):
    code, out, err = run_cli(capsys, "demo", "--backend", "numpy")
    assert code == 0, err
    line = next(i for i, s in enumerate(out.splitlines()) if s.startswith("time:"))
    assert "median of 5 forwards of the one batch of 6, after a warm-up forward" in out.splitlines()[line + 1]


# ---------------------------------------------------------------- help that explains, --version


def help_text(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())                    # argparse's line wrapping undone


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"minifca {minifca.__version__}"


def test_fca_keep_help_says_one_value_cuts_once(capsys, minilm_path):
    text = help_text(capsys, "run")
    assert "ORIGINAL length" in text and "0.5 cuts once" in text and "1,0.8,0.6,0.5,0.4,0.3" in text
    assert "17 -> 10 and stays 10" in text and "(17, 15, 12, 10, 8, 7 units)" in text
    from minifca.explain import picture
    model = minifca.from_pretrained(minilm_path, backend="numpy")
    sentence = "A man is playing a guitar on stage in front of a large audience ."        # 17 tokens
    for keep, units in [("0.5", [10] * 6), ("1,0.8,0.6,0.5,0.4,0.3", [17, 15, 12, 10, 8, 7])]:
        from minifca.commands.common import parse_keep
        fca = minifca.FCAConfig(keep=parse_keep(keep))
        assert [L["units"] for L in picture(model, sentence, fca)["layers"]] == units   # what the help claims


def test_fca_rules_listed_and_checked(capsys):
    text = help_text(capsys, "run")
    for name in (*minifca.SCORES, *minifca.AGGREGATES):
        assert name in text
    with pytest.raises(SystemExit) as e:                                 # argparse's one-line error, exit 2
        cli.main(["run", "--fca-score", "loudest", "x"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid choice: 'loudest'" in err and "attention_received" in err


def test_ablate_help_shows_every_default():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices["ablate"]
    for a in sub._actions:
        if a.help and a.default not in (None, False, "==SUPPRESS==") and a.dest != "help":
            assert "default" in a.help, a.dest
