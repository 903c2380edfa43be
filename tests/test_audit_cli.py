"""Audit of wrong command lines: each is one `minifca: error:` line (or argparse's usage error), exit code 2,
before any long work — never a traceback, a silent default or NaN figures."""
from __future__ import annotations

import pytest

from minifca import calibrate, cli, data
from minifca.commands import calibrate as calibrate_command, explain as explain_command
from minifca.errors import ConfigError, InputError

from conftest import SST2_DEV


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def usage_error(capsys, *argv):
    """argparse refuses the value: exit 2 and its `error: argument ...` line."""
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in argv])
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def small_dev(tmp_path):
    lines = SST2_DEV.read_text(encoding="utf-8").splitlines()[:9]
    p = tmp_path / "dev.tsv"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


@pytest.mark.parametrize("kind", ["folder", "binary"])
def test_schedule_that_is_a_folder_or_binary_is_an_error_line(capsys, sst2_path, tmp_path, kind):
    path = tmp_path
    if kind == "binary":
        path = tmp_path / "s.json"
        path.write_bytes(b"\x80\x81\xff\x00")
    code, _, err = run_cli(capsys, "run", "--model", sst2_path, "--fca-schedule", path, "a fine film")
    assert code == 2 and err.startswith("minifca: error:") and str(path) in err and len(err.splitlines()) == 1


def test_ablate_schedule_folder_is_an_error_line(capsys, sst2_path, small_dev, tmp_path):
    code, _, err = run_cli(capsys, "ablate", "--model", sst2_path, "--data", small_dev, "--keep", "0.5",
                           "--schedules", tmp_path, "--out", tmp_path / "ab")
    assert code == 2 and err.startswith("minifca: error:") and str(tmp_path) in err


def test_binary_data_file_is_an_input_error(tmp_path):
    p = tmp_path / "dev.tsv"
    p.write_bytes(b"\x80\x81\xff\x00sentence\tlabel\n")
    with pytest.raises(InputError, match="UTF-8"):
        data.read_tsv(p)


def test_eval_out_that_is_a_file_is_an_error_line(capsys, sst2_path, small_dev, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    code, _, err = run_cli(capsys, "eval", "--model", sst2_path, "--data", small_dev, "--out", f, "--fca-keep", "0.5")
    assert code == 2 and err.startswith("minifca: error:") and str(f) in err and len(err.splitlines()) == 1


def test_ablate_keep_not_numbers_is_an_error_line(capsys, sst2_path, small_dev, tmp_path):
    code, _, err = run_cli(capsys, "ablate", "--model", sst2_path, "--data", small_dev, "--keep", "abc",
                           "--out", tmp_path / "ab")
    assert code == 2 and err.startswith("minifca: error:") and "--keep" in err


def test_rule_with_bad_cluster_count_is_a_config_error():
    with pytest.raises(ConfigError, match="clusters"):
        calibrate.parse_rule("attention_received+similarity-x")


@pytest.mark.parametrize("argv, flag", [
    (["eval", "--data", "d.tsv", "--limit", "0"], "--limit"),           # was: 0 silently meant "all"
    (["eval", "--data", "d.tsv", "--pad-to", "-1"], "--pad-to"),
    (["ablate", "--data", "d.tsv", "--out", "o", "--limit", "-5"], "--limit"),
    (["calibrate", "--data", "t.tsv", "--out", "s.json", "--target-flops", "0"], "--target-flops"),
    (["calibrate", "--data", "t.tsv", "--out", "s.json", "--target-flops", "1.5"], "--target-flops"),
    (["calibrate", "--data", "t.tsv", "--out", "s.json", "--target-flops", "0.5", "--samples", "0"], "--samples"),
    (["calibrate", "--data", "t.tsv", "--out", "s.json", "--target-flops", "0.5", "--floor", "0"], "--floor"),
    (["calibrate", "--data", "t.tsv", "--out", "s.json", "--target-flops", "0.5", "--step", "0"], "--step"),
    (["bench", "--quick", "--runs", "0"], "--runs"),                     # was: 0 meant the default, -1 gave NaN
    (["bench", "--quick", "--threads", "0"], "--threads"),
])
def test_out_of_range_numbers_are_refused_before_anything_runs(capsys, argv, flag):
    err = usage_error(capsys, *argv)
    assert f"argument {flag}" in err


def test_calibrate_out_folder_is_refused_before_the_search(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(calibrate_command, "calibrate", lambda *a, **k: pytest.fail("the search ran"))
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\na fine film\t1\n")
    code, _, err = run_cli(capsys, "calibrate", "--data", train, "--target-flops", "0.5", "--out", tmp_path)
    assert code == 2 and err.startswith("minifca: error:") and "--out" in err


def test_too_long_input_names_a_flag_that_exists(capsys, sst2_path):
    code, _, err = run_cli(capsys, "run", "--model", sst2_path, "good " * 600)
    assert code == 2 and "--max-length" in err and "--truncate" not in err
    code, _out, err = run_cli(capsys, "run", "--model", sst2_path, "--max-length", "64", "good " * 600)
    assert code == 0, err


def test_closed_stdout_stops_quietly(capsys, monkeypatch):
    """`minifca demo | head -1`: no traceback and no error line when the reader leaves."""
    def closed(args):
        raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(explain_command, "cmd_explain", closed)
    dup2 = []
    monkeypatch.setattr(cli.os, "dup2", lambda *a: dup2.append(a))    # keep pytest's stdout
    monkeypatch.setattr(cli.sys.stdout, "fileno", lambda: 1, raising=False)
    code = cli.main(["explain", "text"])
    assert code == 141 and capsys.readouterr().err == "" and dup2 and dup2[0][1] == 1
