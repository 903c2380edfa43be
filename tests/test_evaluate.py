"""minifca eval / ablate / calibrate: data readers, resumable passes, JSON fields, calibration data hygiene."""
from __future__ import annotations

import builtins
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import minifca
from minifca import ablate as ab, calibrate as cal, data as D, evaluate as ev
from minifca.cli import main
from minifca.errors import ConfigError, InputError

from conftest import SST2_MODEL

SENTENCES = [("a gripping , funny and moving film .", 1), ("dull , lifeless and far too long .", 0),
             ("one of the best films of the year", 1), ("a mess from start to finish", 0),
             ("charming performances all round", 1), ("i wanted my two hours back", 0),
             ("warm , witty and wise", 1), ("the plot makes no sense at all , and the jokes fall flat", 0),
             ("a small gem", 1), ("boring", 0)]


def write_tsv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sst2_model(sst2_path):
    return minifca.from_pretrained(sst2_path, backend="numpy")


@pytest.fixture
def sst2_tsv(tmp_path):
    return write_tsv(tmp_path / "train.tsv", ["sentence", "label"], [(s + " ", y) for s, y in SENTENCES])


# ---------------------------------------------------------------- readers


def test_single_sentence_tsv_strips_and_reads_int_labels(sst2_tsv):
    d = D.load_data(sst2_tsv)
    assert d.texts == [s for s, _ in SENTENCES] and d.pairs is None
    assert d.labels == [y for _, y in SENTENCES]
    assert len(D.load_data(sst2_tsv, limit=3)) == 3


@pytest.mark.parametrize("header", [("sentence1", "sentence2"), ("question", "sentence"), ("question1", "question2")])
def test_pair_tsv(tmp_path, header):
    f = write_tsv(tmp_path / "dev.tsv", ["idx", *header, "label"], [(0, "what is it ?", "it is a cat .", "entailment"),
                                                                    (1, "who ?", "nobody .", "not_entailment")])
    d = D.load_data(f)
    assert d.texts == ["what is it ?", "who ?"] and d.pairs == ["it is a cat .", "nobody ."]
    cfg = types.SimpleNamespace(id2label={0: "entailment", 1: "not_entailment"}, num_labels=2)
    assert D.label_ids(d.labels, cfg).tolist() == [0, 1]
    with pytest.raises(InputError, match="label 'entailment' is not one of"):
        D.label_ids(d.labels, types.SimpleNamespace(id2label={0: "neg", 1: "pos"}, num_labels=2))


def test_tsv_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\ngood\t1\nno label field\n")
    with pytest.raises(InputError, match=r"bad.tsv:3: 1 tab-separated fields"):
        D.load_data(bad)
    nolabel = write_tsv(tmp_path / "nolabel.tsv", ["sentence", "score"], [("a", 1)])
    with pytest.raises(InputError, match="nolabel.tsv: no label column"):
        D.load_data(nolabel)
    test = write_tsv(tmp_path / "test.tsv", ["sentence", "label"], [("a", -1), ("b", -1)])
    with pytest.raises(InputError, match="test split without labels"):
        D.load_data(test)
    with pytest.raises(InputError, match="missing.tsv: data file not found"):
        D.load_data(tmp_path / "missing.tsv")


def fake_pyarrow(monkeypatch, tables):
    """A stand-in pyarrow.parquet whose read_table returns the columns registered for each path."""
    pq = types.ModuleType("pyarrow.parquet")
    pq.read_table = lambda p: types.SimpleNamespace(to_pydict=lambda: tables[str(p)])
    pa = types.ModuleType("pyarrow")
    pa.parquet = pq
    monkeypatch.setitem(sys.modules, "pyarrow", pa)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", pq)


def hub_layout(root):
    """GLUE as nyu-mll/glue lays it out: <task>/<split>-0000N-of-0000M.parquet."""
    shards = {root / "sst2" / "validation-00000-of-00002.parquet": {"sentence": ["good .", "bad ."], "label": [1, 0],
                                                                     "idx": [0, 1]},
              root / "sst2" / "validation-00001-of-00002.parquet": {"sentence": ["fine ."], "label": [1], "idx": [2]},
              root / "sst2" / "train-00000-of-00001.parquet": {"sentence": ["x"], "label": [0], "idx": [0]}}
    for p in shards:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"PAR1")
    return {str(p): v for p, v in shards.items()}


def test_glue_hub_layout_folder_reads_every_shard(tmp_path, monkeypatch):
    fake_pyarrow(monkeypatch, hub_layout(tmp_path))
    d = D.load_data(tmp_path, subset="sst2", split="validation")
    assert d.texts == ["good .", "bad .", "fine ."] and d.labels == [1, 0, 1]
    assert D.load_data(tmp_path, subset="sst2", split="train").texts == ["x"]
    with pytest.raises(InputError, match="no 'test' split"):
        D.load_data(tmp_path, subset="sst2", split="test")


def test_glue_tsv_folder_dev_is_validation(tmp_path):
    write_tsv(tmp_path / "SST-2" / "dev.tsv", ["sentence", "label"], [("ok", 1)])
    assert D.load_data(tmp_path, subset="SST-2", split="validation").texts == ["ok"]


def test_hub_id_goes_through_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub
    fake_pyarrow(monkeypatch, hub_layout(tmp_path))
    calls = []

    def fake_snapshot(repo_id, repo_type=None, allow_patterns=None):
        calls.append((repo_id, repo_type, allow_patterns))
        return str(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    d = D.load_data("nyu-mll/glue", subset="sst2")
    assert calls == [("nyu-mll/glue", "dataset", ["sst2/*"])] and len(d) == 3

    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(InputError, match="nyu-mll/glue: not a local file or folder.*no network"):
        D.load_data("nyu-mll/glue", subset="sst2")


def test_parquet_without_pyarrow_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    f = tmp_path / "validation.parquet"
    f.write_bytes(b"PAR1")
    with pytest.raises(InputError, match="validation.parquet: reading parquet needs pyarrow: pip install pyarrow"):
        D.load_data(f)


# ---------------------------------------------------------------- passes, eval


class Interrupt(Exception):
    pass


def test_predict_resumes_from_its_cache(sst2_model, sst2_tsv, tmp_path):
    data = D.load_data(sst2_tsv)
    batches = ev.make_batches(sst2_model, data, batch_size=3)
    fca = minifca.FCAConfig(keep=0.5)
    plain = ev.predict(sst2_model, data, fca, batches)
    calls, interrupt = [], [True]
    real = type(sst2_model).__call__

    def flaky(self, enc, **kw):  # the second batch is interrupted
        calls.append(len(enc))
        if interrupt[0] and len(calls) == 2:
            raise Interrupt
        return real(self, enc, **kw)
    type(sst2_model).__call__ = flaky
    try:
        with pytest.raises(Interrupt):
            ev.predict(sst2_model, data, fca, batches, cache_dir=tmp_path)
        (cache,) = tmp_path.glob("*.jsonl")
        assert len(cache.read_text().splitlines()) == 1
        calls.clear()
        interrupt[0] = False
        again = ev.predict(sst2_model, data, fca, batches, cache_dir=tmp_path)
    finally:
        type(sst2_model).__call__ = real
    assert len(calls) == len(batches) - 1                           # the cached batch is not run again
    np.testing.assert_allclose(again["logits"], plain["logits"], rtol=1e-6, atol=1e-6)
    assert again["flops"] == plain["flops"] and again["flops_full"] == plain["flops_full"]


def test_batching_by_length_keeps_the_data_order(sst2_model, sst2_tsv):
    data = D.load_data(sst2_tsv)
    alone = np.stack([sst2_model(sst2_model.tokenize([t])).logits[0] for t in data.texts])
    got = ev.predict(sst2_model, data, None, ev.make_batches(sst2_model, data, batch_size=4))["logits"]
    from conftest import model_bound
    np.testing.assert_allclose(got, alone, rtol=0, atol=model_bound(alone, sst2_model.config, extra_depth=2))


def test_eval_json_fields(sst2_tsv, capsys):
    args = ["eval", "--model", str(SST2_MODEL), "--backend", "numpy", "--data", str(sst2_tsv), "--json"]
    assert main(args + ["--fca-keep", "0.5", "--batch-size", "4"]) == 0
    r = json.loads(capsys.readouterr().out)
    for k in ("accuracy", "agreement", "flops", "flops_full", "flops_full_padded", "examples", "seconds"):
        assert k in r, k
    assert r["examples"] == len(SENTENCES) and 0 <= r["accuracy"] <= 1 and 0 <= r["agreement"] <= 1
    assert 0 < r["flops"] < r["flops_full"] < r["flops_full_padded"]  # short sentences, padded to 64
    assert r["fca"]["keep"] == 0.5 and r["seconds"] > 0
    assert main(args + ["--limit", "4"]) == 0                         # no FCA: the full model agrees with itself
    r = json.loads(capsys.readouterr().out)
    assert r["agreement"] == 1.0 and r["flops"] == r["flops_full"] and r["examples"] == 4
    assert main(["eval", "--model", str(SST2_MODEL), "--backend", "numpy", "--data", str(sst2_tsv), "--limit", "2"]) == 0
    text = capsys.readouterr().out
    assert "accuracy" in text and "agreement" in text and "examples/s" in text


# ---------------------------------------------------------------- ablate


def test_interrupted_eval_says_what_was_kept(sst2_tsv, tmp_path, capsys, monkeypatch):
    """Ctrl-C in `eval`: exit 130, and the message says whether the batches done were kept (--out) or not."""
    from minifca import evaluate as E
    real = E.forward_shard

    def shard_then_interrupt(model, shard, fca, pad_to):
        if fca is not None:                                          # the full model done, then Ctrl-C in the FCA pass
            raise KeyboardInterrupt
        return real(model, shard, fca, pad_to)
    monkeypatch.setattr(E, "forward_shard", shard_then_interrupt)
    args = ["eval", "--model", str(SST2_MODEL), "--backend", "numpy", "--data", str(sst2_tsv), "--fca-keep", "0.5"]
    assert main(args) == 130
    assert "nothing was kept" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "cache")]) == 130
    err = capsys.readouterr().err
    assert "kept in" in err and "resumes" in err
    assert list((tmp_path / "cache").glob("*.jsonl"))                 # the full model's batches are there


def test_split_or_subset_with_a_single_file_is_an_error(sst2_tsv, capsys):
    base = ["eval", "--model", str(SST2_MODEL), "--backend", "numpy", "--data", str(sst2_tsv)]
    for extra in (["--split", "train"], ["--subset", "sst2"]):
        assert main(base + extra) == 2
        assert "single file" in capsys.readouterr().err


def small_grid(layers=6):
    return ab.grid(layers, ["attention_received", "random"], ["drop", "weighted"], [0.5])


def test_ablate_writes_rows_and_resumes(sst2_model, sst2_tsv, tmp_path):
    data = D.load_data(sst2_tsv)
    logs = []
    rows = ab.ablate(sst2_model, data, small_grid(), tmp_path, batch_size=5, log=logs.append)
    assert [r["label"] for r in rows] == ["full model", "attention_received + drop", "attention_received + weighted",
                                         "random + drop", "random + weighted"]
    assert float(rows[0]["agreement"]) == 1.0 and float(rows[0]["flops_ratio"]) == 1.0
    assert all(float(r["flops_ratio"]) < 1 for r in rows[1:])
    md = (tmp_path / "results.md").read_text()
    assert md.count("| attention_received + drop |") == 2 and "| rule | keep 0.5 |" in md
    assert (tmp_path / "tradeoff.png").stat().st_size > 0 and (tmp_path / "tradeoff_padded.png").exists()
    # a rerun computes nothing: every row is done
    logs.clear()
    again = ab.ablate(sst2_model, data, small_grid(), tmp_path, batch_size=5, log=logs.append)
    assert again == rows and sum("done already" in s for s in logs) == 4
    # an interrupted run (last row missing) computes just that row
    lines = (tmp_path / "results.csv").read_text().splitlines()
    (tmp_path / "results.csv").write_text("\n".join(lines[:-1]) + "\n")
    logs.clear()
    again = ab.ablate(sst2_model, data, small_grid(), tmp_path, batch_size=5, log=logs.append)
    assert sum("done already" in s for s in logs) == 3 and len(again) == len(rows)
    assert again[-1]["label"] == "random + weighted" and again[-1]["accuracy"] == rows[-1]["accuracy"]


def test_ablate_without_matplotlib_still_writes_csv_and_table(sst2_model, sst2_tsv, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    logs = []
    ab.ablate(sst2_model, D.load_data(sst2_tsv, limit=4), small_grid()[:1], tmp_path, log=logs.append)
    assert (tmp_path / "results.csv").exists() and (tmp_path / "results.md").exists()
    assert not (tmp_path / "tradeoff.png").exists()
    assert any("matplotlib is not installed" in s and "pip install 'minifca[plot]'" in s for s in logs)


def test_grid_shapes_and_schedule_files(tmp_path):
    assert ab.schedule(0.4, "uniform", 3) == [0.4] * 3
    assert ab.schedule(0.4, "linear", 4) == [1.0, 0.8, 0.6, 0.4]
    with pytest.raises(ConfigError, match="shape 'cubic' unknown"):
        ab.schedule(0.4, "cubic", 4)
    f = tmp_path / "s.json"
    minifca.FCAConfig(keep=[1.0, 0.5], score="cls_attention").save(f)
    rows = ab.grid(2, ["attention_received"], ["clusters"], [0.5, 0.3], clusters=3, schedules=[f])
    assert [r[0] for r in rows] == ["attention_received + clusters-3"] * 2 + ["schedule s.json"]
    assert rows[0][2].clusters == 3 and rows[-1][2].score == "cls_attention"


# ---------------------------------------------------------------- calibrate


def test_calibrate_reads_only_its_data_and_meets_the_budget(sst2_tsv, tmp_path, capsys, monkeypatch):
    dev = write_tsv(sst2_tsv.parent / "dev.tsv", ["sentence", "label"], [("never to be read", 1)])
    opened = []
    real_open = builtins.open

    def spy(file, *a, **k):
        opened.append(str(file))
        return real_open(file, *a, **k)
    monkeypatch.setattr(builtins, "open", spy)
    out = tmp_path / "schedule.json"
    assert main(["calibrate", "--model", str(SST2_MODEL), "--backend", "numpy", "--data", str(sst2_tsv),
                 "--samples", "6", "--pool", "8", "--descent-samples", "3", "--target-flops", "0.6", "--step", "0.5", "--refine", "0",
                 "--out", str(out)]) == 0
    monkeypatch.setattr(builtins, "open", real_open)
    data_files = {f for f in opened if f.endswith((".tsv", ".parquet"))}
    assert data_files == {str(sst2_tsv)} and str(dev) not in opened
    d = json.loads(out.read_text())
    assert d["meta"]["sample_flops_ratio"] <= 0.6 and d["meta"]["samples"] == 6 and d["meta"]["pool"] == 8
    cfg = minifca.FCAConfig.load(out)
    assert all(a >= b for a, b in zip(cfg.keep, cfg.keep[1:])) and len(cfg.keep) == 6
    # the schedule works with --fca-schedule, and gives the FLOPs it promised on the sample it was made on
    capsys.readouterr()
    assert main(["eval", "--model", str(SST2_MODEL), "--backend", "numpy", "--data", str(sst2_tsv),
                 "--fca-schedule", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["fca"]["keep"] == cfg.keep and r["flops"] < r["flops_full"]


def test_calibrate_refuses_a_dev_file(tmp_path, capsys):
    dev = write_tsv(tmp_path / "dev.tsv", ["sentence", "label"], [("a", 1)])
    assert main(["calibrate", "--model", str(SST2_MODEL), "--data", str(dev), "--target-flops", "0.5",
                 "--out", str(tmp_path / "s.json")]) == 2
    assert "dev.tsv: calibrate searches on training data" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()


def test_calibrate_search_keeps_agreement_under_budget(sst2_model, sst2_tsv):
    data = D.load_data(sst2_tsv)
    drop = cal.parse_rule("random+drop")
    cfg, best = cal.calibrate(sst2_model, data.subset(range(4)), 0.7, step=0.5, refine=1, rules=[drop],
                             log=lambda s: None)
    assert best["flops_ratio"] <= 0.7 and cfg.keep == best["keep"]
    assert (cfg.score, cfg.aggregate) == (("random", "drop") if best["rule"] == drop else ("attention_received",
                                                                                         "weighted"))
    data = data.subset(range(4))
    run = ev.predict(sst2_model, data, cfg, ev.make_batches(sst2_model, data))
    assert run["flops"] / run["flops_full"] == pytest.approx(best["flops_ratio"])
    with pytest.raises(ConfigError, match="above the target"):
        cal.calibrate(sst2_model, data, 0.01, step=0.5, floor=0.5, log=lambda s: None)


def test_calibrate_starts_from_a_given_schedule(sst2_model, sst2_tsv):
    data = D.load_data(sst2_tsv, limit=3)
    cfg, best = cal.calibrate(sst2_model, data, 1.0, start=[1.0, 1.0, 0.5, 0.5, 0.5, 0.5], refine=0, log=lambda s: None)
    assert cfg.keep == [1.0, 1.0, 0.5, 0.5, 0.5, 0.5] and best["evaluations"] == 1  # in budget: nothing to search


def test_least_sure_picks_the_smallest_margins(sst2_model, sst2_tsv):
    data = D.load_data(sst2_tsv)
    logits = ev.predict(sst2_model, data, None, ev.make_batches(sst2_model, data))["logits"]
    margin = np.abs(logits[:, 1] - logits[:, 0])
    picked = cal.least_sure(sst2_model, data, 3, batch_size=4)
    assert list(picked) == sorted(picked) and len(picked) == 3
    assert margin[picked].max() <= np.delete(margin, picked).min()


def test_eval_needs_a_classifier_head(minilm_path, sst2_tsv, capsys):
    assert main(["eval", "--model", str(minilm_path), "--backend", "numpy", "--data", str(sst2_tsv)]) == 2
    assert "needs a checkpoint with a classifier head" in capsys.readouterr().err


def test_parse_rule():
    assert cal.parse_rule("cls_attention+similarity-2+prop") == {"score": "cls_attention", "aggregate": "similarity",
                                                               "clusters": 2, "proportional_attention": True}
    assert cal.parse_rule("random+drop")["clusters"] == 1
    with pytest.raises(ConfigError, match="write score\\+aggregate"):
        cal.parse_rule("random")


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "docs" / "schedules").glob("*.json")),
                         ids=lambda p: p.name)
def test_shipped_schedules_load(path):
    cfg = minifca.FCAConfig.load(path)
    cfg.check_layers(6)                                              # made for the 6-layer SST-2 fine-tune
    assert all(a >= b for a, b in zip(cfg.keep, cfg.keep[1:]))


def test_eval_resumed_from_out_does_not_reprint_cached_speed(tmp_path, capsys):
    """A rerun with --out reads every batch back: its speed is 'not measured', not the first run's figure;
    a half-cached run times only the batches it computed."""
    sst2 = SST2_MODEL.parent.parent / "data" / "sst2" / "dev.tsv"
    args = ["eval", "--model", str(SST2_MODEL), "--data", str(sst2), "--limit", "12", "--batch-size", "4",
            "--out", str(tmp_path / "cache")]
    assert main(args + ["--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["examples_timed"] == 12 and first["examples_per_second"] > 0
    assert main(args + ["--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["examples_timed"] == 0 and again["examples_per_second"] is None and again["seconds"] == 0
    assert again["accuracy"] == first["accuracy"]
    assert main(args) == 0
    assert "speed      not measured (every batch came from --out" in capsys.readouterr().out
    cache = next((tmp_path / "cache").glob("*.jsonl"))
    lines = cache.read_text().splitlines()
    keep = [line for line in lines if json.loads(line)["batch"] != 1]     # forget one batch of the full model
    cache.write_text("\n".join(keep) + "\n")
    assert main(args + ["--json"]) == 0
    part = json.loads(capsys.readouterr().out)
    assert part["examples_timed_full"] == part["examples_timed"] == 4       # no FCA flags: the one pass
