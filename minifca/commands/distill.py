"""`minifca distill`: re-train a checkpoint with FCA in place, against the same checkpoint without it."""
from __future__ import annotations

import sys

from ..distill import distill
from ..errors import ConfigError
from .common import add_json, emit, fca_from_args, fraction, int_at_least


def cmd_distill(args):
    base = fca_from_args(args)
    if args.target_flops is not None and (args.fca_keep is not None or args.fca_schedule):
        raise ConfigError("give either a schedule (--fca-schedule / --fca-keep) or --target-flops, not both")
    if args.target_flops is None and base is None and not args.resume:
        raise ConfigError("distill needs an FCA schedule (--fca-schedule FILE or --fca-keep) or --target-flops X")
    log = lambda s: print(s, file=sys.stderr)
    r = distill(args.model, args.data, args.out, fca=None if args.target_flops is not None else base,
                base=base if args.target_flops is not None else None, target_flops=args.target_flops,
                teacher=args.teacher, steps=args.steps, epochs=args.epochs, batch_size=args.batch_size,
                accumulate=args.accumulate, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
                clip=args.clip, dropout=args.dropout, seed=args.seed, ce=args.ce, kl=args.kl,
                temperature=args.temperature, embedding_loss=args.embedding_loss, max_length=args.max_length,
                resume=args.resume, save_every=args.save_every, calibration_samples=args.calibration_samples,
                progress_bar=None, log_every=args.log_every, log=log)
    if not emit({k: v for k, v in r.items() if k != "history"} | {"final_loss": r["history"][-1]["loss"]
                                                                    if r["history"] else None}, args.json):
        last = r["history"][-1]["loss"] if r["history"] else float("nan")
        print(f"{r['steps']} steps ({r['steps_run']} this run, {r['examples']} examples, {r['seconds']:.0f} s, "
              f"{r['examples_per_s']:.1f} examples/s), last loss {last:.4f}, keep {r['fca']['keep']} -> {r['out']}")


def register(subparsers, parents):
    p = subparsers.add_parser("distill", parents=[parents["fca"]],
                              help="re-train a checkpoint with FCA in place (NumPy backward, no torch)",
                              description="Train the checkpoint with FCA on, to match the same checkpoint without "
                                          "it (or --teacher). A labelled TSV: cross-entropy + KL to the teacher's "
                                          "logits; unlabelled text (one per line, or a TSV without labels): a "
                                          "classifier matches the teacher's logits (KL alone), a sentence encoder "
                                          "its pooled embedding. Writes a Hugging Face "
                                          "folder (config.json, model.safetensors, tokenizer files) with the "
                                          "schedule as fca.json; Ctrl-C saves, --resume continues.")
    p.add_argument("--model", required=True, help="the checkpoint folder to train (the student)")
    p.add_argument("--data", required=True, help="training data: labelled TSV/parquet, or text one per line")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write (a Hugging Face checkpoint)")
    p.add_argument("--teacher", default=None, help="teacher checkpoint (default: --model without FCA)")
    p.add_argument("--target-flops", type=fraction, default=None,
                   help="calibrate a schedule at this fraction of the full model's FLOPs on the training data first")
    p.add_argument("--calibration-samples", type=int_at_least(1), default=512,
                   help="training examples the calibration uses (default 512)")
    p.add_argument("--steps", type=int_at_least(1), default=None, help="optimizer steps (default: --epochs)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data when --steps is not given")
    p.add_argument("--batch-size", type=int_at_least(1), default=32, help="examples per micro-batch (default 32)")
    p.add_argument("--accumulate", type=int_at_least(1), default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (default 5e-5)")
    p.add_argument("--warmup", type=float, default=0.06, help="warm-up: a fraction of the steps, or a count >= 1")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not biases/LayerNorms)")
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0 = none)")
    p.add_argument("--dropout", type=float, default=0.1, help="hidden and attention dropout (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order, dropout and calibration sample")
    p.add_argument("--ce", type=float, default=1.0, help="weight of the cross-entropy (labelled data)")
    p.add_argument("--kl", type=float, default=1.0, help="weight of the KL to the teacher (labelled data)")
    p.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    p.add_argument("--embedding-loss", choices=["cosine", "mse"], default="cosine", help="unlabelled data's loss")
    p.add_argument("--max-length", type=int_at_least(2), default=128, help="truncate inputs (default 128 tokens)")
    p.add_argument("--save-every", type=int_at_least(0), default=0, help="also save every N steps (0: at the end)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--log-every", type=float, default=60.0, metavar="SECONDS",
                   help="without a progress bar (stderr not a terminal): a line with step, loss, examples/s and "
                        "ETA every SECONDS (default 60)")
    add_json(p)
    p.set_defaults(func=cmd_distill)
