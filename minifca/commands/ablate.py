"""`minifca ablate`: a grid of FCA rules x keep levels on one data set."""
from __future__ import annotations

from pathlib import Path

from ..ablate import ablate, grid
from ..errors import ConfigError
from ..fca import AGGREGATES, SCORES
from .common import add_cluster, add_data_flags, data_from_args, int_at_least, load_model, runner_from_args


def cmd_ablate(args):
    model = load_model(args)
    data = data_from_args(args, args.limit)
    split = lambda s: [v.strip() for v in s.split(",") if v.strip()]
    prop = {"off": (False,), "on": (True,), "both": (False, True)}[args.proportional]
    try:
        levels = [float(v) for v in split(args.keep)]
    except ValueError:
        raise ConfigError(f"--keep: cannot read {args.keep!r} as comma-separated numbers (e.g. 0.7,0.5,0.3)") from None
    rows = grid(model.config.num_hidden_layers, split(args.scores), split(args.aggregates),
                levels, args.shape, args.clusters, prop, args.start_layer,
                args.schedules or ())
    with runner_from_args(args) as runner:
        ablate(model, data, rows, args.out, args.batch_size, args.pad_to, args.max_length, progress=True,
               runner=runner)
    print(f"wrote {Path(args.out) / 'results.csv'} and results.md")



def register(subparsers, parents):
    p = subparsers.add_parser("ablate", parents=[parents["model"]], help="a grid of FCA rules x keep levels",
                              description="Every scoring rule x aggregation rule x keep level (plus schedule files) "
                                          "on one data set, the full model's predictions computed once. Writes "
                                          "DIR/results.csv (a row per configuration as it finishes; a rerun skips "
                                          "finished rows), DIR/results.md and DIR/tradeoff.png, tradeoff_padded.png.")
    add_data_flags(p, "validation")
    p.add_argument("--limit", type=int_at_least(1), default=None, help="only the first N examples")
    p.add_argument("--scores", default="attention_received,random", help="comma-separated scoring rules, of " + ", ".join(SCORES) + " (default attention_received,random)")
    p.add_argument("--aggregates", default="drop,weighted", help="comma-separated aggregation rules, of " + ", ".join(AGGREGATES) + " (default drop,weighted)")
    p.add_argument("--keep", default="0.9,0.7,0.5,0.4,0.3", help="comma-separated keep levels (default 0.9,0.7,0.5,0.4,0.3)")
    p.add_argument("--shape", default="uniform", choices=["uniform", "linear"],
                   help="uniform: the level on every layer; linear: 1.0 at layer 0 down to the level at the last "
                        "(default uniform)")
    p.add_argument("--clusters", type=int_at_least(1), default=2, help="coarse units for the clusters/similarity rules (default 2)")
    p.add_argument("--proportional", default="off", choices=["off", "on", "both"], help="proportional attention: off, on, or both (each configuration twice; default off)")
    p.add_argument("--start-layer", type=int_at_least(0), default=0, help="first layer that reduces (default 0)")
    p.add_argument("--schedules", nargs="*", default=None, metavar="FILE.json", help="schedule files run as they are (default none)")
    p.add_argument("--pad-to", type=int_at_least(1), default=64, help="padded length of the padded FLOPs baseline (default 64)")
    p.add_argument("--out", required=True, metavar="DIR", help="where results go")
    add_cluster(p)
    p.set_defaults(func=cmd_ablate)
