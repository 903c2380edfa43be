"""`minifca embed`'s job as library functions: texts from a file -> one vector per text, in input order, to a file.

    read_texts(path, column)      .txt (any suffix but these): one text per line, every line (vector i = line i,
                                  blank lines included); .tsv: a header line and a text column (`column`, else
                                  the first of sentence, text); .parquet: a text column likewise (needs pyarrow)
    open_writer(out, n, dim)      by out's suffix: .npy [N, H] float32; .parquet (columns text, embedding);
                                  .jsonl ({"text": ..., "embedding": [...]} per line). Written as a .partial file
                                  and renamed when complete, so an interrupted run leaves no half-written output
    embed_file(model, path, out)  the two around embed_shard, in windows of texts (each sorted by length and
                                  written in input order), with one progress bar
    embed_shard(model, shard)     the unit of work: a shard of a window's batches -> their vectors, run here or
                                  on a Dask cluster's worker (runner=, minifca.cluster)
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from .data import SINGLE_COLUMNS
from .errors import InputError
from .progress import progress

WINDOW = 8192   # texts tokenized, sorted and held at once: sorting a window instead of all keeps padding small


# ---------------------------------------------------------------- reading


def read_texts(path, column=None) -> list:
    """The texts of a file, in file order (see the module docstring for the formats)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: input file not found" if not path.exists() else f"{path}: not a file")
    if path.suffix == ".parquet":
        return _parquet_column(path, column)
    try:
        text = path.read_text(encoding="utf-8-sig")              # a byte-order mark (Excel, Notepad) is skipped
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()                                                  # the final newline ends the last line
    lines = [line.removesuffix("\r") for line in lines]
    if path.suffix != ".tsv":
        if column is not None:
            raise InputError(f"{path}: --column/column= picks a column of a .tsv or .parquet file; "
                             "this file is read as one text per line")
        if not lines:
            raise InputError(f"{path}: empty input file")
        return lines
    if not lines:
        raise InputError(f"{path}: empty TSV file (a header line naming the columns is needed)")
    header = [h.strip() for h in lines[0].split("\t")]
    j = _column_index(header, column, path)
    texts = []
    for i, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != len(header):
            raise InputError(f"{path}:{i}: {len(fields)} tab-separated fields, the header has {len(header)}")
        texts.append(fields[j].strip())
    if not texts:
        raise InputError(f"{path}: a header line and no texts")
    return texts


def _column_index(header, column, path) -> int:
    lower = [h.lower() for h in header]
    want = [column.lower()] if column is not None else SINGLE_COLUMNS
    for name in want:
        if name in lower:
            return lower.index(name)
    what = f"no column {column!r}" if column is not None else f"no text column (looked for {', '.join(SINGLE_COLUMNS)})"
    raise InputError(f"{path}: {what}; its columns: {', '.join(header)}" + ("" if column else "; give --column NAME"))


def _parquet_column(path, column):
    pq = _pyarrow(path)[1]
    table = pq.read_table(str(path))
    j = _column_index(table.column_names, column, path)
    return [str(s) for s in table.column(j).to_pylist()]


def _pyarrow(path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: parquet needs pyarrow: pip install pyarrow (or minifca[parquet])") from None
    return pa, pq


# ---------------------------------------------------------------- writing


class _Writer:
    """Rows [start, start + len) of the output, written window by window in input order."""

    def __init__(self, out: Path, n: int, dim: int):
        self.out, self.n, self.dim = out, n, dim
        self.partial = out.with_name(out.name + ".partial")
        self.done = 0

    def write(self, start, vectors, texts):
        if start != self.done:
            raise ValueError(f"rows must come in order: expected {self.done}, got {start}")
        self._write(np.asarray(vectors, np.float32), list(texts))
        self.done += len(vectors)

    def close(self):
        self._close()
        if self.done != self.n:
            raise ValueError(f"{self.out}: {self.done} of {self.n} rows written")
        os.replace(self.partial, self.out)

    def abort(self):
        self._close()
        self.partial.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        self.abort() if kind is not None else self.close()


class _Npy(_Writer):
    def __init__(self, out, n, dim):
        super().__init__(out, n, dim)
        self.array = np.lib.format.open_memmap(self.partial, mode="w+", dtype=np.float32, shape=(n, dim))

    def _write(self, v, texts):
        self.array[self.done:self.done + len(v)] = v                # [w, H]

    def _close(self):
        if self.array is not None:
            self.array.flush()
            self.array = None


class _Jsonl(_Writer):
    def __init__(self, out, n, dim):
        super().__init__(out, n, dim)
        self.f = open(self.partial, "w", encoding="utf-8")  # noqa: SIM115 - the writer's own file, closed by _close

    def _write(self, v, texts):
        for t, e in zip(texts, v.tolist()):
            self.f.write(json.dumps({"text": t, "embedding": e}, ensure_ascii=False) + "\n")

    def _close(self):
        if not self.f.closed:
            self.f.close()


class _Parquet(_Writer):
    def __init__(self, out, n, dim):
        super().__init__(out, n, dim)
        self.pa, pq = _pyarrow(out)
        self.schema = self.pa.schema([("text", self.pa.string()),
                                      ("embedding", self.pa.list_(self.pa.float32(), dim))])
        self.w = pq.ParquetWriter(str(self.partial), self.schema)

    def _write(self, v, texts):
        flat = self.pa.array(v.reshape(-1), self.pa.float32())
        emb = self.pa.FixedSizeListArray.from_arrays(flat, self.dim)
        self.w.write_table(self.pa.Table.from_arrays([self.pa.array(texts, self.pa.string()), emb],
                                                     schema=self.schema))

    def _close(self):
        if self.w is not None:
            self.w.close()
            self.w = None


WRITERS = {".npy": _Npy, ".jsonl": _Jsonl, ".parquet": _Parquet}   # output suffix -> writer


def check_output(out) -> Path:
    """The output path, if its suffix names a format (so a typo fails before any work)."""
    out = Path(out)
    if out.suffix not in WRITERS:
        raise InputError(f"{out}: the output's suffix picks its format: {', '.join(WRITERS)}")
    if out.is_dir():
        raise InputError(f"{out}: is a folder; give a file name ending in {', '.join(WRITERS)}")
    if out.suffix == ".parquet":
        _pyarrow(out)
    return out


def open_writer(out, n, dim) -> _Writer:
    """A writer for n vectors of dim floats: .write(start, vectors, texts) in order, then .close()."""
    out = check_output(out)
    return WRITERS[out.suffix](out, n, dim)


def write_vectors(out, vectors, texts):
    """All vectors [N, H] (row i for texts[i]) to `out` in one go."""
    vectors = np.asarray(vectors, np.float32)
    with open_writer(out, len(vectors), vectors.shape[1]) as w:
        w.write(0, vectors, texts)


# ---------------------------------------------------------------- the job


def embed_shard(model, shard, fca=None, normalize=None):
    """The unit of work of `embed_file`, here or on a cluster's worker: [(rows, Encoding)] -> [(rows, vectors [b, H])]."""
    return [(rows, model.embed_encoding(enc, fca, normalize)) for rows, enc in shard]


def embed_file(model, path, out, column=None, fca=None, batch_size=32, max_length=None, normalize=None,
               threads=None, show_progress_bar=None, window=WINDOW, runner=None, shard_batches=4) -> dict:
    """Embed every text of `path` into `out` (row i = text i). show_progress_bar: True, False, or None (a bar
    when stderr is a terminal). Returns what was done: texts, dim, out, seconds (the whole job, reading and
    writing included), texts_per_second, pooling, normalized, max_length.

    Each window's batches go to `runner` in shards of `shard_batches` batches (cluster.Serial(), the default,
    runs them here in order); a cluster gets the next window's shards before this window is collected, and
    the vectors are the serial run's, written in input order by this process alone."""
    from .cluster import Serial
    out = check_output(out)
    texts = read_texts(path, column)
    runner = runner or Serial()
    dim = model.config.hidden_size
    t0 = time.perf_counter()

    def submit(start):
        """Window `start`'s texts tokenized and sorted here, its shards handed to the runner."""
        part, ml, trunc = model.sentence_inputs(texts[start:start + window], max_length, None)
        batches = list(model.batches(part, None, batch_size, ml, trunc))
        shards = [runner.share(batches[i:i + shard_batches]) for i in range(0, len(batches), shard_batches)]
        return runner.map(embed_shard, model, [(s, fca, normalize) for s in shards])

    starts = list(range(0, len(texts), window))
    with model.limit_threads(threads), open_writer(out, len(texts), dim) as w, \
            progress(len(texts), "embed", show_progress_bar) as bar:
        pending = submit(starts[0])
        for k, start in enumerate(starts):
            done, pending = pending, (submit(starts[k + 1]) if k + 1 < len(starts) and runner.workers > 1 else None)
            vecs = np.empty((min(window, len(texts) - start), dim), np.float32)  # [w, H]
            for _, res in done:
                for rows, v in res:
                    vecs[rows] = v                                   # back in input order within the window
                    bar.update(len(rows))
            w.write(start, vecs, texts[start:start + window])
            if pending is None and k + 1 < len(starts):
                pending = submit(starts[k + 1])
    seconds = time.perf_counter() - t0
    st = model.sentence
    return {"texts": len(texts), "dim": model.config.hidden_size, "out": str(out), "input": str(path),
            "seconds": seconds, "texts_per_second": len(texts) / max(seconds, 1e-9), "pooling": st.pooling,
            "normalized": st.normalize if normalize is None else bool(normalize),
            "max_length": max_length or st.max_seq_length or model.config.max_position_embeddings}
