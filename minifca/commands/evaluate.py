"""`minifca eval`: accuracy, agreement with the full model and FLOPs of an FCA configuration on a labelled data set."""
from __future__ import annotations

import sys

from ..data import looks_like_sts, read_sts
from ..errors import InputError
from ..evaluate import evaluate_many
from ..fca import FCAConfig
from ..similarity import evaluate_similarity
from .common import (
    add_cluster,
    add_data_flags,
    add_json,
    data_from_args,
    emit,
    fca_from_args,
    int_at_least,
    load_model,
    runner_from_args,
)


def print_eval(r):
    print(f"{r['model']} on {r['data']} ({r['examples']} examples, {r['backend']} backend)")
    print(f"FCA: {FCAConfig.from_dict(r['fca']).describe() if r['fca'] else 'off (the full model)'}")
    print(f"accuracy   {r['accuracy']:.4f}  (full model {r['accuracy_full']:.4f}, "
          f"{100 * (r['accuracy'] - r['accuracy_full']):+.2f} points)")
    print(f"agreement  {r['agreement']:.4f}  with the full model's predictions")
    print(f"FLOPs      {r['flops'] / 1e9:.2f} G = {r['flops_ratio']:.1%} of the full model on the real tokens, "
          f"{r['flops_ratio_padded']:.1%} of the full model padded to {r['pad_to']} "
          f"(padding alone: the full model is {r['flops_full'] / r['flops_full_padded']:.1%} of its padded self)")
    print(f"speed      {speed(r['examples_timed'], r['seconds'], r['examples'])}; full model "
          f"{speed(r['examples_timed_full'], r['seconds_full'], r['examples'])}")


def speed(timed, seconds, n):
    """examples/s of the forwards this run made (batches read back from --out were timed by an earlier run)."""
    if not timed:
        return "not measured (every batch came from --out's results of an earlier run)"
    rate = f"{timed / max(seconds, 1e-9):.0f} examples/s ({seconds:.1f} s of forwards"
    return rate + (f" over the {timed} examples run now; {n - timed} came from --out)" if timed < n else ")")


def print_similarity(r):
    print(f"{r['model']} on {r['data']} ({r['pairs']} sentence pairs; Spearman of the cosine similarity)")
    print(f"FCA: {FCAConfig.from_dict(r['fca']).describe() if r['fca'] else 'off (the full model)'}")
    if r["fca"]:
        print(f"Spearman   {r['spearman']:.4f}  (full model {r['spearman_full']:.4f}, "
              f"{100 * (r['spearman'] - r['spearman_full']):+.2f} points)")
        print(f"cosine     {r['cosine_to_full']:.4f}  mean, each sentence's embedding to the full model's")
    else:
        print(f"Spearman   {r['spearman']:.4f}")
    print(f"FLOPs      {r['flops'] / 1e9:.2f} G = {r['flops_ratio']:.1%} of the full model on the real tokens")


def cmd_similarity(args, model, fcas, names):
    """eval on an STS Benchmark file: Spearman of the pairs' cosine similarity, per configuration."""
    if args.out or args.cluster or args.limit:
        raise InputError("eval on sentence pairs with similarity scores (STS) takes no --out, --cluster or --limit")
    data = read_sts(args.data)
    res = [evaluate_similarity(model, data, f, args.batch_size, progress=True) for f in fcas]
    if not emit(res[0] if len(res) == 1 else res, args.json):
        for i, (f, r) in enumerate(zip(names, res)):
            print(("\n" if i else "") + (f"schedule {f}\n" if f else ""), end="")
            print_similarity(r)


def cmd_eval(args):
    model = load_model(args)
    fca = fca_from_args(args, model.config.num_hidden_layers)
    schedules = [FCAConfig.load(f) for f in args.schedules or ()]
    fcas = ([fca] if fca is not None or not schedules else []) + schedules   # the flags' configuration, then the files
    names = [None] * (len(fcas) - len(schedules)) + list(args.schedules or ())  # a schedule file's name, or None
    if looks_like_sts(args.data):
        return cmd_similarity(args, model, fcas, names)
    data = data_from_args(args, args.limit)
    try:
        with runner_from_args(args) as runner:
            res = evaluate_many(model, data, fcas, args.batch_size, args.pad_to, args.max_length, args.out,
                                progress=True, runner=runner)
    except KeyboardInterrupt:
        print("minifca eval: interrupted; " + (f"the batches done are kept in {args.out}: the same command resumes"
              if args.out else "nothing was kept (with --out DIR each batch is kept as it comes, and a rerun "
              "resumes from it)"), file=sys.stderr)
        raise
    if not emit(res[0] if len(res) == 1 else res, args.json):
        for i, (name, r) in enumerate(zip(names, res)):
            print(("\n" if i else "") + (f"schedule {name}" if name else ""), end="\n" if name else "")
            print_eval(r)


def register(subparsers, parents):
    p = subparsers.add_parser("eval", parents=[parents["model"], parents["fca"]],
                              help="accuracy, agreement and FLOPs of FCA on a labelled data set (or STS similarity)",
                              description="Runs the full model and the FCA configuration over a GLUE-style data set; "
                                          "prints accuracy, agreement with the full model, FLOPs against the "
                                          "unpadded and the padded full model, and examples/s. On an STS "
                                          "Benchmark file (sts-dev.csv: pairs with a 0-5 similarity score) it "
                                          "embeds both sentences of each pair and prints the Spearman correlation "
                                          "of their cosine similarity with the gold scores, with and without FCA.")
    add_data_flags(p, "validation")
    p.add_argument("--limit", type=int_at_least(1), default=None, help="only the first N examples")
    p.add_argument("--pad-to", type=int_at_least(1), default=64, help="padded length of the padded FLOPs baseline (default 64, "
                                                          "the FCA paper's SST-2 setting)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="keep each batch's results here as they come; an interrupted run, rerun with the same "
                        "flags, resumes from them (off by default: a cache keyed by paths and flags would not see "
                        "a changed checkpoint or a re-registered rule)")
    p.add_argument("--schedules", nargs="+", default=None, metavar="FILE.json",
                   help="schedule files (FCAConfig.save, `minifca calibrate`) evaluated too, each beside the full "
                        "model (whose pass is made once); --json prints a list")
    add_cluster(p)
    add_json(p)
    p.set_defaults(func=cmd_eval)
