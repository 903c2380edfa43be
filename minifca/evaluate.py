"""FCA on real data: `minifca eval`, `minifca ablate`, `minifca calibrate`.

    data       GLUE-style TSV (`sentence<TAB>label`; pairs `sentence1/sentence2`, `question/sentence`, ...),
               parquet, a folder laid out like GLUE on the hub (`sst2/validation-*.parquet`), or a hub
               dataset id fetched with huggingface_hub (`--data nyu-mll/glue --subset sst2`)
    predict    one pass of a model (plain or FCA) over a data set: logits and FLOPs (both baselines);
               batches of similar length; each batch's results appended to a cache file as it comes,
               so an interrupted run resumes where it stopped
    eval       accuracy, agreement with the full model, FLOPs, examples/s
    ablate     a grid of scoring x aggregation rules x keep levels -> results.csv, results.md, tradeoff.png
    calibrate  a gradient-free search for per-layer keep ratios that keeps agreement with the full model
               highest under a FLOPs budget, on a sample of the training split
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CheckpointError, ConfigError, InputError

# ---------------------------------------------------------------- data

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

    def subset(self, idx) -> "Dataset":
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
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
    strip = lambda xs: [str(s).strip() for s in xs]  # noqa: E731
    if pair is not None:
        return Dataset(strip(cols[pair[0]]), strip(cols[pair[1]]), labels, source)
    return Dataset(strip(cols[single]), None, labels, source)


def _label(v):
    s = str(v).strip()
    try:
        return int(float(s)) if s.lstrip("-").replace(".", "", 1).isdigit() else s
    except ValueError:
        return s


def read_tsv(path) -> Dataset:
    """A GLUE TSV with a header line; fields split on tabs (GLUE text has no quoting)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline="") as f:
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


def read_file(path) -> Dataset:
    return read_parquet(path) if Path(path).suffix == ".parquet" else read_tsv(path)


def split_files(root, subset=None, split="validation") -> list:
    """The files of one split in a GLUE-like folder: [subset/]{split}.tsv|.parquet or {split}-*.parquet shards."""
    folder = Path(root) / subset if subset else Path(root)
    for name in SPLIT_NAMES.get(split, [split]):
        for pattern in (f"{name}.tsv", f"{name}.parquet", f"{name}-*.parquet", f"{name}-*.tsv"):
            files = sorted(folder.glob(pattern))
            if files:
                return files
    found = sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if p.suffix in (".tsv", ".parquet"))
    raise InputError(f"{folder}: no {split!r} split (looked for {split}.tsv, {split}.parquet, {split}-*.parquet); "
                     f"data files there: {', '.join(found) or 'none'}" + ("" if subset else "; give --subset?"))


def data_from_args(args, limit=None) -> Dataset:
    """load_data from the command line's --data/--subset/--split (which only choose inside a folder or hub id)."""
    if Path(str(args.data)).expanduser().is_file() and (args.subset or args.split):
        raise InputError(f"{args.data}: a single file; --subset/--split choose inside a folder or hub dataset "
                         "(drop them)")
    return load_data(args.data, args.subset, args.split or args.default_split, limit)


def load_data(spec, subset=None, split="validation", limit=None) -> Dataset:
    """A data file, a GLUE-like folder, or a hub dataset id (e.g. nyu-mll/glue with subset sst2)."""
    path = Path(str(spec)).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = split_files(path, subset, split)
    else:
        s = str(spec)
        if s.startswith((".", "/", "~")) or s.count("/") > 1 or not s or path.suffix in (".tsv", ".parquet"):
            raise InputError(f"{s}: data file not found")
        try:
            from huggingface_hub import snapshot_download
            local = snapshot_download(s, repo_type="dataset", allow_patterns=[f"{subset}/*"] if subset else None)
        except Exception as e:  # offline, missing repo: one clear message
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
            raise InputError(f"{source}: label {y!r} is not one of the model's labels {sorted(cfg.id2label.values())}")
        if not 0 <= i < cfg.num_labels:
            raise InputError(f"{source}: label {i} outside the model's {cfg.num_labels} classes")
        out.append(i)
    return np.array(out, np.int64)


# ---------------------------------------------------------------- one pass over a data set


def make_batches(model, data, batch_size=64, max_length=None):
    """[(indices, Encoding)]: examples sorted by token count (less padding), each batch trimmed to its longest."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    enc = model.tokenize(data.texts, data.pairs, max_length=max_length)
    order = np.argsort(enc.attention_mask.sum(1), kind="stable")    # [N] shortest first
    return [(idx, enc[idx]) for idx in (order[i:i + batch_size] for i in range(0, len(order), batch_size))]


def run_key(model, data, fca, batches, pad_to) -> str:
    """What a pass depends on: model, data, FCA configuration, batching, padded length."""
    spec = {"model": str(model.path), "backend": model.backend, "data": data.source, "n": len(data),
            "fca": None if fca is None else fca.to_dict(), "batches": [len(i) for i, _ in batches], "L": [e.input_ids.shape[1] for _, e in batches], "pad_to": pad_to}
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def predict(model, data, fca, batches, pad_to=64, cache_dir=None, progress=False, desc=""):
    """Logits [N, C] and summed FLOPs/seconds of one pass. With cache_dir, each batch's result is appended
    to cache_dir/<key>.jsonl as it comes and batches already there are not run again."""
    if "classifier" not in model.params:
        raise CheckpointError(f"{model.path}: evaluating on labelled data needs a checkpoint with a classifier head "
                              "(classifier.*)")
    done = {}
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"{run_key(model, data, fca, batches, pad_to)}.jsonl"
        cache.parent.mkdir(parents=True, exist_ok=True)
        if cache.exists():
            for line in cache.read_text().splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # a line cut by an interruption
                    continue
                done[r["batch"]] = r
    logits = [None] * len(batches)
    total = {"flops": 0, "flops_full": 0, "flops_full_padded": 0, "seconds": 0.0}
    bar = _progress(len(data), desc, progress)
    for b, (idx, enc) in enumerate(batches):
        r = done.get(b)
        if r is None:
            t = time.perf_counter()
            out = model(enc, fca=fca, pad_to=pad_to)
            r = {"batch": b, "logits": out.logits.astype(np.float64).tolist(), "flops": out.flops,
                 "flops_full": out.flops_full, "flops_full_padded": out.flops_full_padded,
                 "seconds": time.perf_counter() - t}
            if cache is not None:
                with open(cache, "a") as f:
                    f.write(json.dumps(r) + "\n")
        logits[b] = np.array(r["logits"])
        for k in total:
            total[k] += r[k]
        bar.update(len(idx))
    bar.close()
    order = np.concatenate([i for i, _ in batches])
    res = np.empty((len(order), logits[0].shape[1]))
    res[order] = np.concatenate(logits)                             # back to the data's order
    return {"logits": res, **total}


def _progress(total, desc, on):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="ex", leave=False, disable=not (on and sys.stderr.isatty()))


def summarize(run, labels, full_pred=None) -> dict:
    pred = run["logits"].argmax(1)
    n = len(pred)
    return {"accuracy": float(np.mean(pred == labels)),
            "agreement": 1.0 if full_pred is None else float(np.mean(pred == full_pred)),
            "flops": int(run["flops"]), "flops_full": int(run["flops_full"]),
            "flops_full_padded": int(run["flops_full_padded"]),
            "flops_ratio": run["flops"] / run["flops_full"], "flops_ratio_padded": run["flops"] / run["flops_full_padded"],
            "examples": n, "seconds": run["seconds"], "examples_per_second": n / max(run["seconds"], 1e-9)}


# ---------------------------------------------------------------- eval


def evaluate(model, data, fca=None, batch_size=64, pad_to=64, max_length=None, cache_dir=None, progress=False):
    """accuracy, agreement with the full model, FLOPs (both baselines), examples, seconds (+ the full model's)."""
    labels = label_ids(data.labels, model.config, data.source)
    batches = make_batches(model, data, batch_size, max_length)
    full = predict(model, data, None, batches, pad_to, cache_dir, progress, "full model")
    full_pred = full["logits"].argmax(1)
    run = full if fca is None else predict(model, data, fca, batches, pad_to, cache_dir, progress, "FCA")
    res = summarize(run, labels, full_pred)
    res.update({"accuracy_full": float(np.mean(full_pred == labels)), "seconds_full": full["seconds"],
                "model": str(model.path), "data": data.source, "backend": model.backend, "pad_to": pad_to,
                "fca": None if fca is None else fca.to_dict()})
    return res


def print_eval(r):
    print(f"{r['model']} on {r['data']} ({r['examples']} examples, {r['backend']} backend)")
    print(f"FCA: {describe(r['fca']) if r['fca'] else 'off (the full model)'}")
    print(f"accuracy   {r['accuracy']:.4f}  (full model {r['accuracy_full']:.4f}, "
          f"{100 * (r['accuracy'] - r['accuracy_full']):+.2f} points)")
    print(f"agreement  {r['agreement']:.4f}  with the full model's predictions")
    print(f"FLOPs      {r['flops'] / 1e9:.2f} G = {r['flops_ratio']:.1%} of the full model on the real tokens, "
          f"{r['flops_ratio_padded']:.1%} of the full model padded to {r['pad_to']} "
          f"(padding alone: the full model is {r['flops_full'] / r['flops_full_padded']:.1%} of its padded self)")
    print(f"speed      {r['examples_per_second']:.0f} examples/s ({r['seconds']:.1f} s; full model "
          f"{r['examples'] / max(r['seconds_full'], 1e-9):.0f} examples/s)")


def describe(fca: dict) -> str:
    keep = fca["keep"]
    keep = ",".join(f"{v:g}" for v in keep) if isinstance(keep, list) else f"{keep:g}"
    s = f"keep {keep}, score {fca['score']}, aggregate {fca['aggregate']}"
    if fca["clusters"] > 1:
        s += f", {fca['clusters']} clusters"
    if fca["proportional_attention"]:
        s += ", proportional attention"
    if fca["start_layer"]:
        s += f", from layer {fca['start_layer']}"
    return s


def cmd_eval(args):
    from .cli import emit, fca_from_args, load_model
    model = load_model(args)
    fca = fca_from_args(args, model.config.num_hidden_layers)
    data = data_from_args(args, args.limit)
    try:
        res = evaluate(model, data, fca, args.batch_size, args.pad_to, args.max_length, args.out, progress=True)
    except KeyboardInterrupt:
        print("minifca eval: interrupted; " + (f"the batches done are kept in {args.out}: the same command resumes"
              if args.out else "nothing was kept (with --out DIR each batch is kept as it comes, and a rerun "
              "resumes from it)"), file=sys.stderr)
        raise
    if not emit(res, args.json):
        print_eval(res)


# ---------------------------------------------------------------- ablate

CSV_FIELDS = ["key", "label", "score", "aggregate", "clusters", "proportional", "start_layer", "keep", "level",
              "accuracy", "agreement", "flops_ratio", "flops_ratio_padded", "flops", "flops_full",
              "flops_full_padded", "examples", "seconds"]


def schedule(level, shape, layers):
    """Per-layer keep ratios for one level: uniform = level on every layer; linear = 1.0 at layer 0 down to
    level at the last layer."""
    if shape == "uniform":
        return [float(level)] * layers
    if shape == "linear":
        return [round(1 - (1 - level) * i / max(layers - 1, 1), 4) for i in range(layers)]
    raise ConfigError(f"schedule shape {shape!r} unknown; choose uniform or linear")


def grid(layers, scores, aggregates, levels, shape="uniform", clusters=2, proportional=(False,), start_layer=0,
         schedules=()):
    """[(row label, level, FCAConfig)] for every score x aggregate x proportional x level, then the schedule files."""
    from .fca import FCAConfig
    rows = []
    for score in scores:
        for agg in aggregates:
            for prop in proportional:
                c = clusters if agg in ("clusters", "similarity") else 1
                label = f"{score} + {agg}" + (f"-{c}" if c > 1 else "") + (" + prop" if prop else "")
                for level in levels:
                    rows.append((label, level, FCAConfig(keep=schedule(level, shape, layers), score=score,
                                                         aggregate=agg, clusters=c, proportional_attention=prop,
                                                         start_layer=start_layer)))
    for f in schedules:
        rows.append((f"schedule {Path(f).name}", "", FCAConfig.load(f)))
    return rows


def read_rows(path) -> list:
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def ablate(model, data, rows, out, batch_size=64, pad_to=64, max_length=None, progress=False, log=print):
    """Run the grid `rows`, appending one CSV row per configuration as it finishes (rows already in
    out/results.csv are skipped, a half-done one resumes from its cached batches); then the table and plots."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = label_ids(data.labels, model.config, data.source)
    batches = make_batches(model, data, batch_size, max_length)
    cache = out / "cache"
    full = predict(model, data, None, batches, pad_to, cache, progress, "full model")
    full_pred = full["logits"].argmax(1)
    csv_path = out / "results.csv"
    done = {r["key"] for r in read_rows(csv_path)}
    full_row = {"key": run_key(model, data, None, batches, pad_to), "label": "full model", "keep": "1.0", "level": 1.0,
                **summarize(full, labels)}
    new_file = not csv_path.exists()
    with open(csv_path, "a", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
        if new_file:
            w.writeheader()
        if full_row["key"] not in done:
            w.writerow(full_row)
        for label, level, fca in rows:
            key = run_key(model, data, fca, batches, pad_to)
            if key in done:
                log(f"done already: {label} {level}")
                continue
            r = summarize(predict(model, data, fca, batches, pad_to, cache, progress, f"{label} {level}"), labels,
                          full_pred)
            keep = fca.keep if not isinstance(fca.keep, list) else ",".join(f"{v:g}" for v in fca.keep)
            row = {"key": key, "label": label, "score": fca.score, "aggregate": fca.aggregate,
                   "clusters": fca.clusters, "proportional": fca.proportional_attention,
                   "start_layer": fca.start_layer, "keep": keep, "level": level, **r}
            w.writerow(row)
            f.flush()
            done.add(key)
            log(f"{label:<45} {level!s:>5}  acc {r['accuracy']:.4f}  agree {r['agreement']:.4f}  "
                f"FLOPs {r['flops_ratio']:.3f} (padded {r['flops_ratio_padded']:.3f})  {r['seconds']:.1f} s")
    table = read_rows(csv_path)
    (out / "results.md").write_text(results_table(table, pad_to) + "\naccuracy (FLOPs / full model, unpadded) by "
                                    "rule and keep level:\n\n" + pivot_table(table))
    plotted = plot(table, out / "tradeoff.png", padded=False) and plot(table, out / "tradeoff_padded.png", padded=True)
    if not plotted:
        log("matplotlib is not installed: wrote results.csv and results.md but no tradeoff.png "
            "(pip install 'minifca[plot]' or pip install matplotlib, then rerun: finished rows are not recomputed)")
    return table


def pivot_table(rows, x="flops_ratio") -> str:
    """Accuracy (FLOPs ratio) of every grid rule (rows) at every keep level (columns)."""
    grid_rows = [r for r in rows if r["label"] != "full model" and not r["label"].startswith("schedule")]
    levels = sorted({r["level"] for r in grid_rows}, key=float, reverse=True)
    cell = {(r["label"], r["level"]): r for r in grid_rows}
    lines = ["| rule | " + " | ".join(f"keep {v}" for v in levels) + " |", "|---" * (len(levels) + 1) + "|"]
    for label in dict.fromkeys(r["label"] for r in grid_rows):
        cells = [cell.get((label, v)) for v in levels]
        lines.append(f"| {label} | " + " | ".join("" if c is None else f"{float(c['accuracy']):.3f} ({float(c[x]):.2f})"
                                                 for c in cells) + " |")
    return "\n".join(lines) + "\n"


def results_table(rows, pad_to=64) -> str:
    lines = [f"| rule | keep | accuracy | agreement | FLOPs / full | FLOPs / full padded-{pad_to} |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['keep']} | {float(r['accuracy']):.4f} | {float(r['agreement']):.4f} | "
                     f"{float(r['flops_ratio']):.3f} | {float(r['flops_ratio_padded']):.3f} |")
    return "\n".join(lines) + "\n"


SCORE_COLORS = {"attention_received": "tab:blue", "cls_attention": "tab:orange", "hidden_norm": "tab:green",
                "attention_entropy": "tab:purple", "random": "0.45"}
AGGREGATE_STYLES = {"drop": ("x", ":"), "mean": ("s", "-."), "weighted": ("o", "-"), "clusters": ("^", "--"),
                    "similarity": ("D", (0, (5, 1)))}


def plot(rows, path, padded=False) -> bool:
    """Accuracy vs FLOPs ratio, one line per rule (colour = score, marker and dashes = aggregation); the full
    model a star, the random-score rules grey (the floor), schedule files black-edged diamonds. False when
    matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    x_of = "flops_ratio_padded" if padded else "flops_ratio"
    fig, ax = plt.subplots(figsize=(11, 6))
    lines = {}
    for r in rows:
        lines.setdefault(r["label"], []).append((float(r[x_of]), float(r["accuracy"]), r))
    for label, pts in lines.items():
        pts.sort(key=lambda p: p[0])
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        r = pts[0][2]
        if label == "full model":
            ax.scatter(xs, ys, marker="*", s=300, color="black", zorder=5, label="full model")
            ax.axhline(ys[0], color="black", lw=0.6, ls=":")
            if padded:                                               # the baseline itself: all of padding's saving
                ax.scatter([1.0], ys, marker="*", s=300, facecolor="none", edgecolor="black", zorder=5,
                           label="full model, padded (= 1)")
                ax.annotate("padding alone", xy=(xs[0], ys[0]), xytext=(0.95, ys[0] + 0.01), va="bottom", ha="right",
                            fontsize=8, arrowprops={"arrowstyle": "->", "lw": 0.8}, xycoords="data",
                            textcoords="data")
        elif label.startswith("schedule"):
            ax.scatter(xs, ys, marker="D", s=45, zorder=4, edgecolor="black", label=label)
        else:
            marker, ls = AGGREGATE_STYLES.get(r["aggregate"], ("o", "-"))
            floor = r["score"] == "random"
            ax.plot(xs, ys, marker=marker, ms=4, lw=1.3, ls=ls, color=SCORE_COLORS.get(r["score"]),
                    alpha=0.8 if floor else 1.0, label=label + (" (floor)" if floor else ""))
    ax.set_xlabel("FLOPs / full model " + ("padded to a fixed length (the paper's baseline)" if padded
                                           else "on the real tokens (unpadded)"))
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def cmd_ablate(args):
    from .cli import load_model
    model = load_model(args)
    data = data_from_args(args, args.limit)
    split = lambda s: [v.strip() for v in s.split(",") if v.strip()]  # noqa: E731
    prop = {"off": (False,), "on": (True,), "both": (False, True)}[args.proportional]
    try:
        levels = [float(v) for v in split(args.keep)]
    except ValueError:
        raise ConfigError(f"--keep: cannot read {args.keep!r} as comma-separated numbers (e.g. 0.7,0.5,0.3)") from None
    rows = grid(model.config.num_hidden_layers, split(args.scores), split(args.aggregates),
                levels, args.shape, args.clusters, prop, args.start_layer,
                args.schedules or ())
    ablate(model, data, rows, args.out, args.batch_size, args.pad_to, args.max_length, progress=True)
    print(f"wrote {Path(args.out) / 'results.csv'} and results.md")


# ---------------------------------------------------------------- calibrate


def calibrate(model, data, target, base=None, step=0.2, floor=0.01, batch_size=64, refine=1, rules=(), start=None,
              log=print):
    """Per-layer keep ratios maximising agreement with the full model on `data` with FLOPs <= target x full.

    Greedy descent from keeping everything (or from `start`): each step lowers one layer's ratio by `step` (later layers
    follow, ratios never increase) and takes the move that loses least (disagreement + mean KL to the full
    model's probabilities) per FLOP saved, until the budget is met. Then `refine` sweeps of coordinate moves
    at half the step (raise one layer, lower another, or just raise one) keep any that stays in budget and
    agrees more (ties: lower KL).
    base: an FCAConfig giving the rules (score, aggregate, clusters, ...); its keep is ignored.
    rules: other rules to try ({field: value} overrides of base, see `parse_rule`) at the keep the descent
    found, before the refinement; the one agreeing most within the budget is kept.
    """
    from .fca import FCAConfig
    from .reference import softmax
    base = (base or FCAConfig()).to_dict()
    layers = model.config.num_hidden_layers
    batches = make_batches(model, data, batch_size)
    p_full = softmax(predict(model, data, None, batches, None)["logits"])  # [N, C]
    full_pred = p_full.argmax(1)
    seen = {}

    rule = {}

    def score(keep, rule_=None):
        rule_ = rule if rule_ is None else rule_
        key = (tuple(round(v, 4) for v in keep), json.dumps(rule_, sort_keys=True))
        if key not in seen:
            fca = FCAConfig(**{**base, **rule_, "keep": list(key[0])})
            run = predict(model, data, fca, batches, None)
            p = softmax(run["logits"])
            kl = float(np.mean(np.sum(p_full * (np.log(p_full + 1e-12) - np.log(p + 1e-12)), 1)))
            seen[key] = {"keep": list(key[0]), "rule": rule_, "agreement": float(np.mean(p.argmax(1) == full_pred)),
                         "kl": kl, "flops_ratio": run["flops"] / run["flops_full"]}
        return seen[key]

    def lower(keep, layer, by):
        new = list(keep)
        new[layer] = round(max(keep[layer] - by, floor), 4)
        return [min(v, new[layer]) if j > layer else v for j, v in enumerate(new)]

    def raise_(keep, layer, by):
        new = list(keep)
        new[layer] = round(min(keep[layer] + by, 1.0), 4)
        return [max(v, new[layer]) if j < layer else v for j, v in enumerate(new)]

    loss = lambda r: (1 - r["agreement"]) + r["kl"]  # noqa: E731
    cur = score(list(start) if start is not None else [1.0] * layers)
    log(f"start: keep {cur['keep']}  FLOPs {cur['flops_ratio']:.3f}  agreement {cur['agreement']:.4f}  "
        f"KL {cur['kl']:.4f}")
    while cur["flops_ratio"] > target:
        moves = [score(lower(cur["keep"], layer, step)) for layer in range(layers) if cur["keep"][layer] > floor]
        moves = [m for m in moves if m["flops_ratio"] < cur["flops_ratio"]]
        if not moves:
            break
        saved = lambda m: cur["flops_ratio"] - m["flops_ratio"]  # noqa: E731
        cur = min(moves, key=lambda m: ((loss(m) - loss(cur)) / saved(m), -saved(m)))
        log(f"descent: keep {cur['keep']}  FLOPs {cur['flops_ratio']:.3f}  agreement {cur['agreement']:.4f}  "
            f"KL {cur['kl']:.4f}")
    if cur["flops_ratio"] > target:
        raise ConfigError(f"calibrate: even keep {cur['keep']} costs {cur['flops_ratio']:.3f} of the full model, "
                          f"above the target {target}")
    better = lambda m, c: (m["agreement"], -m["kl"]) > (c["agreement"], -c["kl"])  # noqa: E731
    for r in rules:
        m = score(cur["keep"], r)
        log(f"rule {r}: FLOPs {m['flops_ratio']:.3f}  agreement {m['agreement']:.4f}  KL {m['kl']:.4f}")
        if m["flops_ratio"] <= target and better(m, cur):
            cur, rule = m, r
    fine = step / 2
    for sweep in range(refine):
        improved = False
        for up in range(layers):
            for down in [None] + list(range(layers)):
                if down == up:
                    continue
                keep = raise_(cur["keep"], up, fine)
                if down is not None:
                    keep = lower(keep, down, fine)
                if keep == cur["keep"]:
                    continue
                m = score(keep)
                if m["flops_ratio"] <= target and better(m, cur):
                    cur, improved = m, True
                    log(f"refine {sweep + 1}: keep {cur['keep']}  FLOPs {cur['flops_ratio']:.3f}  "
                        f"agreement {cur['agreement']:.4f}  KL {cur['kl']:.4f}")
        if not improved:
            break
    cfg = FCAConfig(**{**base, **rule, "keep": cur["keep"]})
    return cfg, {**cur, "evaluations": len(seen)}


def parse_rule(spec: str) -> dict:
    """'score+aggregate[-clusters][+prop]' (e.g. cls_attention+similarity-2+prop) -> FCAConfig overrides."""
    parts = spec.split("+")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "prop"):
        raise ConfigError(f"rule {spec!r}: write score+aggregate[-clusters][+prop], e.g. attention_received+weighted")
    agg, _, c = parts[1].partition("-")
    if c and not c.isdigit():
        raise ConfigError(f"rule {spec!r}: the clusters after '-' must be a number, e.g. {parts[0]}+{agg}-2")
    return {"score": parts[0], "aggregate": agg, "clusters": int(c) if c else 1,
            "proportional_attention": len(parts) == 3}


def least_sure(model, data, n, batch_size=64) -> np.ndarray:
    """Indices (in data order) of the n examples with the smallest margin between the full model's top two logits."""
    logits = predict(model, data, None, make_batches(model, data, batch_size), None)["logits"]  # [N, C]
    top2 = np.sort(logits, 1)[:, -2:]                                # [N, 2]
    return np.sort(np.argsort(top2[:, 1] - top2[:, 0], kind="stable")[:n])


DEV_NAMES = ("dev", "validation", "test")


def cmd_calibrate(args):
    from .cli import fca_from_args, load_model
    from .fca import FCAConfig
    if Path(args.out).is_dir():                                     # before the search, not after it
        raise InputError(f"{args.out}: is a folder; --out is the schedule file to write (e.g. {args.out}/schedule.json)")
    data = data_from_args(args)
    for f in data.source.split(", "):
        if Path(f).name.lower().startswith(DEV_NAMES):
            raise InputError(f"{f}: calibrate searches on training data; this looks like a dev/validation/test "
                             "file, and calibrating on it would leak into the evaluation")
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    rng = np.random.default_rng(args.seed)
    idx = [i for i, t in enumerate(data.texts) if len(t.split()) >= args.min_words]
    if not idx:
        raise InputError(f"{data.source}: no example has >= {args.min_words} words (--min-words)")
    idx = rng.choice(idx, size=min(max(args.samples, args.pool), len(idx)), replace=False).tolist()  # random order
    model = load_model(args)
    if args.pool > args.samples:                                    # keep the examples the full model is least sure of
        log(f"pool: the full model on {len(idx)} training examples, keeping the {args.samples} with the smallest margin")
        idx = [idx[i] for i in least_sure(model, data.subset(idx), args.samples, args.batch_size)]
    sample = data.subset(idx)
    base = fca_from_args(args, model.config.num_hidden_layers) or FCAConfig()
    t = time.perf_counter()
    rules = [parse_rule(r) for r in args.rules or ()]
    for r in rules:
        FCAConfig(**{**base.to_dict(), **r})                         # a bad rule fails before the search
    start = None
    if args.fca_keep is not None or args.fca_schedule:              # a given schedule is where the search starts
        if base.counts:
            raise ConfigError("calibrate searches keep ratios: start it from ratios (e.g. --fca-keep 1,0.8,0.6), "
                              "not counts")
        start = base.keep if isinstance(base.keep, list) else [base.keep] * model.config.num_hidden_layers
        start = [float(v) for v in start]
    elif 0 < args.descent_samples < len(sample):                      # a cheap descent first, then all of the sample
        log(f"descent on the first {args.descent_samples} examples of the sample")
        first, _ = calibrate(model, sample.subset(range(args.descent_samples)), args.target_flops, base, args.step,
                             args.floor, args.batch_size, refine=0, log=log)
        start = first.keep
        log(f"continuing on all {len(sample)} examples from keep {start}")
    cfg, best = calibrate(model, sample, args.target_flops, base, args.step, args.floor, args.batch_size,
                          args.refine, rules, start, log=log)
    d = cfg.to_dict()
    d["meta"] = {"made_by": "minifca calibrate", "model": str(model.path), "data": data.source,
                 "samples": len(sample), "pool": args.pool, "min_words": args.min_words, "seed": args.seed,
                 "target_flops": args.target_flops, "step": args.step,
                 "descent_samples": args.descent_samples,
                 "sample_flops_ratio": round(best["flops_ratio"], 4), "sample_agreement": round(best["agreement"], 4),
                 "sample_kl": round(best["kl"], 5), "evaluations": best["evaluations"],
                 "seconds": round(time.perf_counter() - t, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(d, indent=2) + "\n")
    print(f"keep {cfg.keep}: FLOPs {best['flops_ratio']:.3f} of the full model, agreement {best['agreement']:.4f} "
          f"on {len(sample)} training examples -> {args.out}")


# ---------------------------------------------------------------- command line


def _data_flags(p, split):
    from .cli import int_at_least
    p.add_argument("--data", required=True,
                   help="a TSV/parquet file, a GLUE-like folder, or a hub dataset id (e.g. nyu-mll/glue)")
    p.add_argument("--subset", default=None, help="the task folder inside a GLUE-like folder or hub dataset (e.g. sst2)")
    p.add_argument("--split", default=None, help=f"split to read from a folder or hub dataset (default {split})")
    p.set_defaults(default_split=split)
    p.add_argument("--batch-size", type=int_at_least(1), default=64, help="examples per batch (default 64)")


def register(subparsers, parents):
    from .cli import fraction, int_at_least
    both = [parents["model"], parents["fca"]]
    p = subparsers.add_parser("eval", parents=both, help="accuracy, agreement and FLOPs of FCA on a labelled data set",
                              description="Runs the full model and the FCA configuration over a GLUE-style data set; "
                                          "prints accuracy, agreement with the full model, FLOPs against the "
                                          "unpadded and the padded full model, and examples/s.")
    _data_flags(p, "validation")
    p.add_argument("--limit", type=int_at_least(1), default=None, help="only the first N examples")
    p.add_argument("--pad-to", type=int_at_least(1), default=64, help="padded length of the padded FLOPs baseline (default 64, "
                                                          "the FCA paper's SST-2 setting)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="keep each batch's results here as they come; an interrupted run, rerun with the same "
                        "flags, resumes from them (off by default: a cache keyed by paths and flags would not see "
                        "a changed checkpoint or a re-registered rule)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("ablate", parents=[parents["model"]], help="a grid of FCA rules x keep levels",
                              description="Every scoring rule x aggregation rule x keep level (plus schedule files) "
                                          "on one data set, the full model's predictions computed once. Writes "
                                          "DIR/results.csv (a row per configuration as it finishes; a rerun skips "
                                          "finished rows), DIR/results.md and DIR/tradeoff.png, tradeoff_padded.png.")
    _data_flags(p, "validation")
    p.add_argument("--limit", type=int_at_least(1), default=None, help="only the first N examples")
    p.add_argument("--scores", default="attention_received,random", help="comma-separated scoring rules")
    p.add_argument("--aggregates", default="drop,weighted", help="comma-separated aggregation rules")
    p.add_argument("--keep", default="0.9,0.7,0.5,0.4,0.3", help="comma-separated keep levels")
    p.add_argument("--shape", default="uniform", choices=["uniform", "linear"],
                   help="uniform: the level on every layer; linear: 1.0 at layer 0 down to the level at the last")
    p.add_argument("--clusters", type=int_at_least(1), default=2, help="coarse units for the clusters/similarity rules (default 2)")
    p.add_argument("--proportional", default="off", choices=["off", "on", "both"], help="proportional attention")
    p.add_argument("--start-layer", type=int_at_least(0), default=0, help="first layer that reduces")
    p.add_argument("--schedules", nargs="*", default=None, metavar="FILE.json", help="schedule files run as they are")
    p.add_argument("--pad-to", type=int_at_least(1), default=64, help="padded length of the padded FLOPs baseline (default 64)")
    p.add_argument("--out", required=True, metavar="DIR", help="where results go")
    p.set_defaults(func=cmd_ablate)

    p = subparsers.add_parser("calibrate", parents=both, help="search per-layer keep ratios under a FLOPs budget",
                              description="A gradient-free search (greedy descent, then coordinate moves) for the "
                                          "per-layer keep ratios that agree most with the full model on a sample of "
                                          "the TRAINING data, with FLOPs <= --target-flops of the full model "
                                          "(unpadded). The FCA flags choose the rules (and a keep given by "
                                          "--fca-keep/--fca-schedule is where the search starts); writes a "
                                          "schedule JSON for --fca-schedule.")
    _data_flags(p, "train")
    p.add_argument("--target-flops", type=fraction, required=True, help="FLOPs budget as a fraction of the full model")
    p.add_argument("--samples", type=int_at_least(1), default=512, help="training examples in the calibration sample (default 512)")
    p.add_argument("--pool", type=int_at_least(0), default=0,
                   help="draw this many training examples and calibrate on the --samples of them the full model is "
                        "least sure of (smallest logit margin): held-out data is harder than the training data the "
                        "model has fitted, so agreement there is a better guide (default 0: a plain random sample)")
    p.add_argument("--min-words", type=int_at_least(0), default=0, help="sample only examples with at least this many words")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample")
    p.add_argument("--descent-samples", type=int_at_least(0), default=128,
                   help="run the greedy descent on this many examples of the sample first (faster), then go on with "
                        "all of them (default 128; 0 = all from the start)")
    p.add_argument("--step", type=fraction, default=0.2,
                   help="keep-ratio step of the descent (default 0.2; the refinement uses half of it)")
    p.add_argument("--floor", type=fraction, default=0.01,
                   help="smallest keep ratio tried (default 0.01: [CLS] alone on sentences under 100 tokens)")
    p.add_argument("--refine", type=int_at_least(0), default=1, help="coordinate-move sweeps after the descent (default 1)")
    p.add_argument("--rules", nargs="*", default=None, metavar="SCORE+AGG[-C][+prop]",
                   help="other rules to try at the schedule found (e.g. cls_attention+similarity-2+prop); the best "
                        "within the budget is refined and saved")
    p.add_argument("--out", required=True, metavar="FILE.json", help="the schedule file to write")
    p.set_defaults(func=cmd_calibrate)
