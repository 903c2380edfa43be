"""Labelled data sets: a file, a GLUE-like folder or a hub dataset id -> a Dataset (texts, pairs, labels).

    GLUE-style TSV (`sentence<TAB>label`; pairs `sentence1/sentence2`, `question/sentence`, ...), parquet,
    a folder laid out like GLUE on the hub (`sst2/validation-*.parquet`), or a hub dataset id fetched with
    huggingface_hub (`load_data("nyu-mll/glue", "sst2")`). A file's suffix picks its reader (READERS).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

PAIR_COLUMNS = [("sentence1", "sentence2"), ("question", "sentence"), ("question1", "question2"),
                ("premise", "hypothesis"), ("#1 string", "#2 string")]
SINGLE_COLUMNS = ["sentence", "text"]
LABEL_COLUMNS = ["label", "quality", "gold_label"]
SPLIT_NAMES = {"validation": ["validation", "dev"], "dev": ["dev", "validation"]}


@dataclass
class Dataset:
    texts: list                 # [N] first sentences
    pairs: list | None          # [N] second sentences (pair tasks) or None
    labels: list                # [N] ints or label names
    source: str                 # the file(s) read

    def __len__(self):
        return len(self.texts)

    def subset(self, idx) -> Dataset:
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]
        return Dataset(pick(self.texts), pick(self.pairs), pick(self.labels), self.source)


def from_columns(columns: dict, source: str) -> Dataset:
    """A Dataset from named columns (names matched case-insensitively to the GLUE layouts)."""
    cols = {str(k).strip().lower(): v for k, v in columns.items()}
    label = next((c for c in LABEL_COLUMNS if c in cols), None)
    if label is None:
        raise InputError(f"{source}: no label column (looked for {', '.join(LABEL_COLUMNS)}; found {', '.join(cols)})")
    pair = next((p for p in PAIR_COLUMNS if p[0] in cols and p[1] in cols), None)
    single = next((c for c in SINGLE_COLUMNS if c in cols), None)
    if pair is None and single is None:
        raise InputError(f"{source}: no text column (looked for {', '.join(SINGLE_COLUMNS)} or the pairs "
                         f"{', '.join('/'.join(p) for p in PAIR_COLUMNS)}; found {', '.join(cols)})")
    labels = [_label(v) for v in cols[label]]
    if labels and all(v == -1 for v in labels):
        raise InputError(f"{source}: every label is -1: a test split without labels cannot be evaluated")
    strip = lambda xs: [str(s).strip() for s in xs]
    if pair is not None:
        return Dataset(strip(cols[pair[0]]), strip(cols[pair[1]]), labels, source)
    return Dataset(strip(cols[single]), None, labels, source)


def _label(v):
    """A label as read: an int for an integer ("1", " -1 ", or a parquet 1.0), else the text (a label name,
    matched to the model's id2label by `label_ids`; "1.5" is neither, and is refused there)."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    s = str(v).strip()
    return int(s) if re.fullmatch(r"[+-]?[0-9]+", s) else s


def read_tsv(path) -> Dataset:
    """A GLUE TSV with a header line; fields split on tabs (GLUE text has no quoting). A UTF-8 byte-order
    mark (as Excel and Notepad write) is skipped; lines may end in \\n or \\r\\n."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            lines = [line.rstrip("\r\n") for line in f]
    except FileNotFoundError:
        raise InputError(f"{path}: data file not found") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); a TSV or .parquet file is needed") from None
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise InputError(f"{path}: empty data file (a header line like `sentence<TAB>label` is needed)")
    header = lines[0].split("\t")
    rows = [line.split("\t") for line in lines[1:]]
    for i, r in enumerate(rows):
        if len(r) != len(header):
            raise InputError(f"{path}:{i + 2}: {len(r)} tab-separated fields, the header has {len(header)}")
    return from_columns({h: [r[j] for r in rows] for j, h in enumerate(header)}, str(path))


def read_parquet(path) -> Dataset:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
    return from_columns(pq.read_table(str(path)).to_pydict(), str(path))


READERS = {".tsv": read_tsv, ".parquet": read_parquet}   # suffix -> reader; any other suffix is read as a TSV


def read_file(path) -> Dataset:
    return READERS.get(Path(path).suffix, read_tsv)(path)


def split_files(root, subset=None, split="validation") -> list:
    """The files of one split in a GLUE-like folder: [subset/]{split}.tsv|.parquet or {split}-*.parquet shards."""
    folder = Path(root) / subset if subset else Path(root)
    for name in SPLIT_NAMES.get(split, [split]):
        for pattern in (f"{name}.tsv", f"{name}.parquet", f"{name}-*.parquet", f"{name}-*.tsv"):
            files = sorted(folder.glob(pattern))
            if files:
                return files
    found = sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if p.suffix in READERS)
    raise InputError(f"{folder}: no {split!r} split (looked for {split}.tsv, {split}.parquet, {split}-*.parquet); "
                     f"data files there: {', '.join(found) or 'none'}" + ("" if subset else "; give --subset?"))


def load_data(spec, subset=None, split="validation", limit=None) -> Dataset:
    """A data file, a GLUE-like folder, or a hub dataset id (e.g. nyu-mll/glue with subset sst2)."""
    if not isinstance(spec, (str, Path)) or not str(spec).strip():
        raise InputError(f"data: give a file, a folder or a hub dataset id, got {spec!r}")
    path = Path(str(spec)).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = split_files(path, subset, split)
    else:
        s = str(spec)
        if s.startswith((".", "/", "~")) or s.count("/") > 1 or not s or path.suffix in READERS:
            raise InputError(f"{s}: data file not found")
        try:
            from huggingface_hub import snapshot_download
            local = snapshot_download(s, repo_type="dataset", allow_patterns=[f"{subset}/*"] if subset else None)
        except Exception as e:  # noqa: BLE001 - offline, missing repo: one clear message
            raise InputError(f"{s}: not a local file or folder, and the hub could not provide it: "
                             f"{type(e).__name__}: {e}") from None
        files = split_files(local, subset, split)
    parts = [read_file(f) for f in files]
    data = Dataset([t for p in parts for t in p.texts], None if parts[0].pairs is None else
                   [t for p in parts for t in p.pairs], [y for p in parts for y in p.labels],
                   ", ".join(p.source for p in parts))
    if not len(data):
        raise InputError(f"{data.source}: no examples")
    return data.subset(range(min(limit, len(data)))) if limit else data


def label_ids(labels, cfg, source="data") -> np.ndarray:
    """Labels as class ids of the model: ints as they are, names through the config's id2label."""
    names = {str(v).lower(): k for k, v in cfg.id2label.items()}
    out = []
    for y in labels:
        if isinstance(y, int):
            i = y
        elif str(y).lower() in names:
            i = names[str(y).lower()]
        else:
            raise InputError(f"{source}: label {y!r} is not one of the model's labels {sorted(cfg.id2label.values())} "
                             f"(labels are integer class ids or those names)")
        if not 0 <= i < cfg.num_labels:
            raise InputError(f"{source}: label {i} outside the model's {cfg.num_labels} classes")
        out.append(i)
    return np.array(out, np.int64)



@dataclass
class Similarity:
    """Sentence pairs with a gold similarity score (STS Benchmark): what `similarity.evaluate_similarity` reads."""
    texts: list                 # [N] first sentences
    pairs: list                 # [N] second sentences
    scores: np.ndarray          # [N] float64 gold scores (0-5 in STS-B)
    source: str

    def __len__(self):
        return len(self.texts)


def looks_like_sts(path) -> bool:
    """Whether `path` is a file whose first line reads as an STS Benchmark line (no header, a numeric 5th field)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with open(path, encoding="utf-8-sig") as f:
            first = f.readline().rstrip("\r\n").split("\t")
        float(first[4])
    except (OSError, UnicodeDecodeError, ValueError, IndexError):
        return False
    return len(first) >= 7


def read_sts(path) -> Similarity:
    """An STS Benchmark file as distributed (sts-train.csv / sts-dev.csv): tab-separated, no header, no quoting,
    `genre file year id score sentence1 sentence2 [source columns]`; columns 4-6 are read, the rest ignored."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise InputError(f"{path}: data file not found") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    texts, pairs, scores = [], [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        f = line.split("\t")
        try:
            score = float(f[4]) if len(f) >= 7 else math.nan
        except ValueError:
            score = math.nan
        if not math.isfinite(score) or not f[5].strip() or not f[6].strip():
            raise InputError(f"{path}:{i + 1}: not an STS line (genre, file, year, id, a numeric score, sentence1, "
                             f"sentence2, tab-separated)")
        texts.append(f[5].strip())
        pairs.append(f[6].strip())
        scores.append(score)
    if not texts:
        raise InputError(f"{path}: no sentence pairs")
    return Similarity(texts, pairs, np.array(scores), str(path))


@dataclass
class Texts:
    """Training text: texts [N], pairs [N] or None, labels [N] class ids or None (unlabelled)."""
    texts: list
    pairs: list | None
    labels: np.ndarray | None
    source: str

    def __len__(self):
        return len(self.texts)


def read_training_data(path, cfg=None) -> Texts:
    """Training text for `distill` and `calibrate`: a labelled TSV/parquet (read_file; labels as class ids of
    cfg, or None without cfg), a TSV with a text column and no labels, or one text per line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: training data file not found")
    if path.suffix != ".txt":
        try:
            d = read_file(path)
            labels = None if cfg is None else label_ids(d.labels, cfg, str(path))
            return Texts(d.texts, d.pairs, labels, str(path))
        except InputError as e:
            if "no label column" not in str(e):
                raise
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    lines = [line for line in lines if line]
    header = [h.strip().lower() for h in lines[0].split("\t")] if lines else []
    column = next((header.index(c) for c in ("sentence", "text") if c in header), None)
    if column is not None:                                           # a TSV without labels: its text column
        lines = [r.split("\t")[column] for r in lines[1:] if len(r.split("\t")) > column]
    if not lines:
        raise InputError(f"{path}: no text to train on")
    return Texts(lines, None, None, str(path))
