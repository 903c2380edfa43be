"""`minifca calibrate`: search per-layer keep ratios under a FLOPs budget, on a sample of the training data."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from ..calibrate import calibrate, check_training_data, least_sure, parse_rule
from ..data import Dataset, read_training_data
from ..errors import ConfigError, InputError
from ..fca import FCAConfig
from .common import (
    add_cluster,
    add_data_flags,
    data_from_args,
    fca_from_args,
    fraction,
    int_at_least,
    load_model,
    runner_from_args,
)


def cmd_calibrate(args):
    if Path(args.out).is_dir():                                     # before the search, not after it
        raise InputError(f"{args.out}: is a folder; --out is the schedule file to write (e.g. {args.out}/schedule.json)")
    model = load_model(args)
    objective = "logits" if "classifier" in model.params else "embeddings"  # a sentence encoder: its embeddings
    data = data_from_args(args) if objective == "logits" else unlabelled_from_args(args)
    check_training_data(data)
    if objective == "embeddings" and args.pool:
        raise ConfigError(f"{model.path}: --pool picks the examples a classifier is least sure of; this checkpoint "
                          "has no classifier head (its schedule is searched on embeddings: drop --pool)")
    log = lambda s: print(s, file=sys.stderr)
    rng = np.random.default_rng(args.seed)
    idx = [i for i, t in enumerate(data.texts) if len(t.split()) >= args.min_words]
    if not idx:
        raise InputError(f"{data.source}: no example has >= {args.min_words} words (--min-words)")
    idx = rng.choice(idx, size=min(max(args.samples, args.pool), len(idx)), replace=False).tolist()  # random order
    with runner_from_args(args) as runner:                        # the search's passes, here or on --cluster
        if args.pool > args.samples:                                    # keep the examples the full model is least sure of
            log(f"pool: the full model on {len(idx)} training examples, keeping the {args.samples} with the smallest margin")
            idx = [idx[i] for i in least_sure(model, data.subset(idx), args.samples, args.batch_size, runner)]
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
                                 args.floor, args.batch_size, refine=0, log=log, runner=runner,
                                 objective=objective)
            start = first.keep
            log(f"continuing on all {len(sample)} examples from keep {start}")
        cfg, best = calibrate(model, sample, args.target_flops, base, args.step, args.floor, args.batch_size,
                              args.refine, rules, start, log=log, runner=runner, objective=objective)
    d = cfg.to_dict()
    d["meta"] = {"made_by": "minifca calibrate", "model": str(model.path), "data": data.source, "objective": objective,
                 "samples": len(sample), "pool": args.pool, "min_words": args.min_words, "seed": args.seed,
                 "target_flops": args.target_flops, "step": args.step,
                 "descent_samples": args.descent_samples,
                 "sample_flops_ratio": round(best["flops_ratio"], 4), "sample_agreement": round(best["agreement"], 4),
                 "sample_kl": round(best["kl"], 5), "evaluations": best["evaluations"],
                 "seconds": round(time.perf_counter() - t, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(d, indent=2) + "\n")
    agree = "agreement" if objective == "logits" else "mean cosine to the full model's embeddings"
    print(f"keep {cfg.keep}: FLOPs {best['flops_ratio']:.3f} of the full model, {agree} {best['agreement']:.4f} "
          f"on {len(sample)} training examples -> {args.out}")


def unlabelled_from_args(args):
    """The texts of --data for a checkpoint without a classifier: a labelled file's texts, or unlabelled text
    (one per line, or a TSV with a text column), as `distill` reads them; labels are not used."""
    if args.subset or args.split:
        raise InputError(f"{args.data}: --subset/--split choose a labelled split; a sentence encoder's schedule is "
                         "searched on a text file (drop them)")
    t = read_training_data(args.data)
    return Dataset(t.texts, t.pairs, [0] * len(t), t.source)



def register(subparsers, parents):
    p = subparsers.add_parser("calibrate", parents=[parents["model"], parents["fca"]], help="search per-layer keep ratios under a FLOPs budget",
                              description="A gradient-free search (greedy descent, then coordinate moves) for the "
                                          "per-layer keep ratios that agree most with the full model on a sample of "
                                          "the TRAINING data, with FLOPs <= --target-flops of the full model "
                                          "(unpadded). A checkpoint without a classifier head (a sentence encoder) is "
                                          "scored on unlabelled text by the mean cosine of its embeddings to the "
                                          "full model's. The FCA flags choose the rules (and a keep given by "
                                          "--fca-keep/--fca-schedule is where the search starts); writes a "
                                          "schedule JSON for --fca-schedule.")
    add_data_flags(p, "train")
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
    add_cluster(p)
    p.set_defaults(func=cmd_calibrate)
