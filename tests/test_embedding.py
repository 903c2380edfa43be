"""minifca.embedding (read_texts, writers, embed_file) and the `minifca embed` command."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from minifca.cli import main
from minifca.embedding import embed_file, open_writer, read_texts, write_vectors
from minifca.errors import InputError

from conftest import SST2_TRAIN, model_bound, read_sst2


@pytest.fixture(scope="module")
def texts():
    return read_sst2(SST2_TRAIN, limit=30)[0]


def read_back(out):
    """The vectors (and texts, where the format keeps them) of an output file."""
    if out.suffix == ".npy":
        return np.load(out), None
    if out.suffix == ".jsonl":
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        return np.array([r["embedding"] for r in rows], np.float32), [r["text"] for r in rows]
    import pyarrow.parquet as pq
    t = pq.read_table(out).to_pydict()
    return np.array(t["embedding"], np.float32), t["text"]


# ---------------------------------------------------------------- reading


def test_text_file_every_line_in_order(tmp_path):
    f = tmp_path / "in.txt"
    f.write_bytes(b"first line\r\n\nthird, after a blank one\nlast without newline")
    assert read_texts(f) == ["first line", "", "third, after a blank one", "last without newline"]


def test_tsv_text_column(tmp_path):
    f = tmp_path / "in.tsv"
    f.write_text("id\tSentence\tlabel\n1\ta film\t1\n2\tanother one\t0\n", encoding="utf-8")
    assert read_texts(f) == ["a film", "another one"]
    assert read_texts(f, column="id") == ["1", "2"]
    with pytest.raises(InputError, match="no column 'title'.*id, Sentence, label"):
        read_texts(f, column="title")
    f.write_text("id\tsentence\n1\ta film\n2\tno\ttab too many\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"in.tsv:3: 3 tab-separated fields, the header has 2"):
        read_texts(f)


def test_parquet_input(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    f = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["one", "two"], "label": [0, 1]}), f)
    assert read_texts(f) == ["one", "two"]


@pytest.mark.parametrize("content, match", [("", "empty"), ("sentence\n", "no texts")])
def test_empty_inputs(tmp_path, content, match):
    f = tmp_path / ("in.tsv" if content else "in.txt")
    f.write_text(content)
    with pytest.raises(InputError, match=match):
        read_texts(f)


# ---------------------------------------------------------------- writing


@pytest.mark.parametrize("suffix", [".npy", ".jsonl", ".parquet"])
def test_writers_round_trip_in_order(tmp_path, suffix):
    v = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)
    t = [f"text {i} ü" for i in range(7)]
    out = tmp_path / f"v{suffix}"
    with open_writer(out, 7, 5) as w:
        w.write(0, v[:3], t[:3])
        w.write(3, v[3:], t[3:])
    got, got_t = read_back(out)
    np.testing.assert_array_equal(got, v)                     # float32 stored exactly (JSON keeps 9 digits+)
    assert got_t in (None, t)
    assert not (tmp_path / f"v{suffix}.partial").exists()


def test_interrupted_write_leaves_nothing(tmp_path):
    out = tmp_path / "v.npy"
    with pytest.raises(KeyboardInterrupt), open_writer(out, 4, 2) as w:
        w.write(0, np.ones((2, 2)), ["a", "b"])
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_unknown_output_suffix():
    with pytest.raises(InputError, match=r"\.npy, \.jsonl, \.parquet"):
        write_vectors("out.csv", np.ones((1, 2)), ["a"])


# ---------------------------------------------------------------- the job


def test_embed_file_equals_model_embed_in_input_order(minilm, texts, tmp_path):
    f = tmp_path / "in.txt"
    f.write_text("\n".join(texts) + "\n", encoding="utf-8")
    ref = minilm.embed(texts, batch_size=8)
    res = embed_file(minilm, f, tmp_path / "a.npy", batch_size=8)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), ref)   # one window: embed's very batches
    assert (res["texts"], res["dim"], res["normalized"], res["max_length"]) == (30, 384, True, 256)
    embed_file(minilm, f, tmp_path / "b.jsonl", batch_size=8, window=7)      # 5 windows, each sorted apart
    got, got_t = read_back(tmp_path / "b.jsonl")
    assert got_t == texts
    diff = float(np.abs(got - ref).max())
    assert diff <= model_bound(ref, minilm.config, extra_depth=2), diff  # other batches: float32 rounding only


def test_embed_command(minilm, texts, tmp_path, capsys):
    f = tmp_path / "in.tsv"
    f.write_text("sentence\tlabel\n" + "".join(f"{t}\t0\n" for t in texts[:10]), encoding="utf-8")
    out = tmp_path / "v.parquet"
    assert main(["embed", str(f), "-o", str(out), "--batch-size", "4", "--no-normalize"]) == 0
    msg = capsys.readouterr().out
    assert "wrote 10 embeddings [10, 384]" in msg and "not normalized" in msg
    got, got_t = read_back(out)
    assert got_t == texts[:10]
    ref = minilm.embed(texts[:10], batch_size=4, normalize=False)
    assert float(np.abs(got - ref).max()) <= model_bound(ref, minilm.config, extra_depth=1)


def test_embed_command_errors_are_one_line(tmp_path, capsys):
    f = tmp_path / "in.txt"
    f.write_text("a\n")
    assert main(["embed", str(f), "-o", str(tmp_path / "v.csv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ".npy" in err
    assert main(["embed", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "v.npy")]) == 2
    assert "missing.txt: input file not found" in capsys.readouterr().err


def test_embed_command_entry_point(tmp_path, texts):
    """The installed command in a fresh process, the default checkpoint, --json."""
    f = tmp_path / "in.txt"
    f.write_text("\n".join(texts[:3]) + "\n", encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "minifca.cli", "embed", str(f), "-o", str(tmp_path / "v.npy"),
                        "--json", "--threads", "1"], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["texts"] == 3 and np.load(tmp_path / "v.npy").shape == (3, 384)
    assert r.stderr == ""                                     # no bar when stderr is not a terminal


def test_progress_bar(minilm, texts, tmp_path, capsys):
    f = tmp_path / "in.txt"
    f.write_text("\n".join(texts[:5]) + "\n", encoding="utf-8")
    embed_file(minilm, f, tmp_path / "v.npy", show_progress_bar=True)
    assert "embed:" in capsys.readouterr().err
