"""`ablate`: a grid of scoring x aggregation rules x keep levels on one data set -> results.csv, results.md,
and the accuracy/FLOPs plots (`minifca.plot`); the full model's predictions computed once."""
from __future__ import annotations

import csv
import json
from contextlib import closing
from pathlib import Path

from .data import label_ids
from .errors import ConfigError
from .evaluate import make_batches, predict_many, run_key, summarize
from .fca import FCAConfig, aggregate_facts
from .plot import plot

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
    rows = []
    for score in scores:
        for agg in aggregates:
            for prop in proportional:
                c = clusters if aggregate_facts(agg).coarse_units == "clusters" else 1
                label = f"{score} + {agg}" + (f"-{c}" if c > 1 else "") + (" + prop" if prop else "")
                for level in levels:
                    rows.append((label, level, FCAConfig(keep=schedule(level, shape, layers), score=score,
                                                         aggregate=agg, clusters=c, proportional_attention=prop,
                                                         start_layer=start_layer)))
    for f in schedules:
        rows.append((f"schedule {Path(f).name}", "", FCAConfig.load(f)))
    return rows


RUN_FILE = "run.json"


def run_config(model, data, batches, batch_size, pad_to, max_length) -> dict:
    """What every row of one ablate folder shares: model, data, batching, padded length (`key`: the full
    model's run_key, which changes with any of them, e.g. with --limit)."""
    return {"model": str(model.path), "backend": model.backend, "data": data.source, "examples": len(data),
            "batch_size": batch_size, "max_length": max_length, "pad_to": pad_to,
            "key": run_key(model, data, None, batches, pad_to)}


def claim_folder(out: Path, config: dict):
    """One folder holds one run's configuration (out/run.json): a rerun with it resumes (and may add grid
    rows); one with another refuses, saying what differs, rather than mix two runs' rows in one table."""
    f = out / RUN_FILE
    if f.exists():
        try:
            old = json.loads(f.read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:
            raise ConfigError(f"{f}: unreadable ({e}); delete {out} or choose another --out") from None
        old = old if isinstance(old, dict) else {}
    elif (out / "results.csv").exists():                             # a folder from before run.json
        full = [r for r in read_rows(out / "results.csv") if r.get("label") == "full model"]
        old = {"key": full[0].get("key")} if full else {"key": None}
    else:
        f.write_text(json.dumps(config, indent=2) + "\n")
        return
    if old.get("key") != config["key"]:
        diff = [f"{k}: {old[k]!r} there, {config[k]!r} now" for k in config if k != "key" and k in old and old[k] != config[k]]
        raise ConfigError(f"{out}: holds the results of another ablate run ({'; '.join(diff) or 'another model, data or batching'}); "
                          f"one folder holds one run's configuration: choose another --out, or delete {out}")
    if not f.exists():
        f.write_text(json.dumps(config, indent=2) + "\n")


def read_rows(path) -> list:
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def ablate(model, data, rows, out, batch_size=64, pad_to=64, max_length=None, progress=False, log=print,
           runner=None):
    """Run the grid `rows`, appending one CSV row per configuration as it finishes (rows already in
    out/results.csv are skipped, a half-done one resumes from its cached batches); then the table and plots.
    runner: where the passes run (cluster.Serial here by default, or a Dask runner: every configuration's
    shards at once, rows written as configurations finish, the file put back in grid order at the end)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = label_ids(data.labels, model.config, data.source)
    batches = make_batches(model, data, batch_size, max_length)
    claim_folder(out, run_config(model, data, batches, batch_size, pad_to, max_length))
    cache = out / "cache"
    csv_path = out / "results.csv"
    done = {r["key"] for r in read_rows(csv_path)}
    keys = [run_key(model, data, None, batches, pad_to)] + [run_key(model, data, fca, batches, pad_to)
                                                           for _, _, fca in rows]
    for (label, level, _), key in zip(rows, keys[1:]):
        if key in done:
            log(f"done already: {label} {level}")
    # the full model's pass always (agreement needs it; cached after the first run), each configuration once
    todo = [i for i, key in enumerate(keys) if i == 0 or (key not in done and key not in keys[:i])]
    fcas = [None if i == 0 else rows[i - 1][2] for i in todo]
    new_file = not csv_path.exists()
    passes = predict_many(model, data, fcas, batches, pad_to, cache, runner, progress, f"{len(todo) - 1} configurations")
    with open(csv_path, "a", newline="") as f, closing(passes):      # closed when interrupted: no task left running
        w = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
        if new_file:
            w.writeheader()
        full_pred, waiting = None, {}                                # passes done, waiting for the full model's
        for t, run in passes:
            waiting[todo[t]] = run
            if 0 in waiting:                                         # rows need the full model's predictions
                full_pred = waiting[0]["logits"].argmax(1)
            for i in sorted(waiting) if full_pred is not None else ():
                r = summarize(waiting.pop(i), labels, full_pred if i else None)
                if keys[i] in done:                                  # the full model's row on a rerun
                    continue
                w.writerow(_grid_row(keys[i], None if i == 0 else rows[i - 1], r))
                f.flush()
                done.add(keys[i])
                if i:
                    label, level, _ = rows[i - 1]
                    log(f"{label:<45} {level!s:>5}  acc {r['accuracy']:.4f}  agree {r['agreement']:.4f}  "
                        f"FLOPs {r['flops_ratio']:.3f} (padded {r['flops_ratio_padded']:.3f})  {r['seconds']:.1f} s")
    _in_grid_order(csv_path, keys)
    table = read_rows(csv_path)
    (out / "results.md").write_text(results_table(table, pad_to) + "\naccuracy (FLOPs / full model, unpadded) by "
                                    "rule and keep level:\n\n" + pivot_table(table))
    plotted = plot(table, out / "tradeoff.png", padded=False) and plot(table, out / "tradeoff_padded.png", padded=True)
    if not plotted:
        log("matplotlib is not installed: wrote results.csv and results.md but no tradeoff.png "
            "(pip install 'minifca[plot]' or pip install matplotlib, then rerun: finished rows are not recomputed)")
    return table


def _grid_row(key, grid_row, r) -> dict:
    """results.csv's row of one pass: the grid row (label, level, FCAConfig; None = the full model) and its summary."""
    if grid_row is None:
        return {"key": key, "label": "full model", "keep": "1.0", "level": 1.0, **r}
    label, level, fca = grid_row
    keep = fca.keep if not isinstance(fca.keep, list) else ",".join(f"{v:g}" for v in fca.keep)
    return {"key": key, "label": label, "score": fca.score, "aggregate": fca.aggregate, "clusters": fca.clusters,
            "proportional": fca.proportional_attention, "start_layer": fca.start_layer, "keep": keep,
            "level": level, **r}


def _in_grid_order(csv_path, keys):
    """Rewrite results.csv with this grid's rows in grid order (the full model first) after rows from earlier
    grids, as a serial run writes it; rows finished on a cluster come in any order."""
    rows = read_rows(csv_path)
    rank = {k: i for i, k in enumerate(keys)}
    ordered = sorted(rows, key=lambda r: rank.get(r["key"], -1))    # stable: earlier grids' rows first, as they were
    if [r["key"] for r in ordered] == [r["key"] for r in rows]:
        return
    tmp = csv_path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(ordered)
    tmp.replace(csv_path)


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

