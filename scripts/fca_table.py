"""FCA without re-training on the shared SST-2 fine-tune: accuracy, agreement, FLOPs (both baselines).

    python scripts/fca_table.py [--model DIR] [--data dev.tsv] [--batch 64] [--pad-to 64] [--backend numpy]

Prints a markdown table: one row for the full model, then one per keep x score x aggregate
(uniform keep ratio on every layer from layer 0). FLOPs ratios are summed over the dev set:
FCA FLOPs / full-model FLOPs on the valid tokens (unpadded, the honest baseline), and
FCA FLOPs / full-model FLOPs with every sentence padded to --pad-to tokens (the paper's baseline).
"""
from __future__ import annotations

import argparse
import itertools
import platform
import time
from pathlib import Path

import numpy as np

import minifca

SHARED = Path(__file__).resolve().parents[2] / "shared"
KEEPS = (0.7, 0.5, 0.3)
SCORES = ("attention_received", "random")
AGGREGATES = ("drop", "weighted")


def read_sst2(path):
    rows = [line.rsplit("\t", 1) for line in Path(path).read_text(encoding="utf-8").splitlines()[1:] if line.strip()]
    return [s.strip() for s, _ in rows], np.array([int(y) for _, y in rows])


def evaluate(model, batches, fca, pad_to):
    """Predictions [N] and summed FLOPs (this run, full unpadded, full padded) over all batches."""
    preds, flops, full, padded = [], 0, 0, 0
    t = time.perf_counter()
    for enc in batches:
        out = model.forward(enc.input_ids, enc.attention_mask, enc.token_type_ids, fca=fca, pad_to=pad_to)
        preds.append(out.logits.argmax(1))
        flops, full, padded = flops + out.flops, full + out.flops_full, padded + out.flops_full_padded
    return np.concatenate(preds), flops, full, padded, time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "minilm-l6-sst2"))
    ap.add_argument("--data", default=str(SHARED / "data" / "sst2" / "dev.tsv"))
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--pad-to", type=int, default=64)
    args = ap.parse_args(argv)

    model = minifca.from_pretrained(args.model, backend=args.backend)
    texts, labels = read_sst2(args.data)
    batches = [model.tokenize(texts[i:i + args.batch]) for i in range(0, len(texts), args.batch)]
    layers = model.config.num_hidden_layers
    full_pred, full_flops, _, full_padded, secs = evaluate(model, batches, None, args.pad_to)
    print(f"model {args.model}, {len(texts)} sentences of {args.data}, backend {args.backend}, "
          f"batch {args.batch}, pad_to {args.pad_to}, {platform.processor() or platform.machine()}\n")
    print("| keep | score | aggregate | accuracy | agreement | FLOPs / full | FLOPs / full padded-%d | seconds |"
          % args.pad_to)
    print("|---|---|---|---|---|---|---|---|")
    print(f"| 1.0 | (full model) | | {np.mean(full_pred == labels):.4f} | 1.0000 | 1.000 | "
          f"{full_flops / full_padded:.3f} | {secs:.1f} |", flush=True)
    for keep, score, agg in itertools.product(KEEPS, SCORES, AGGREGATES):
        fca = minifca.FCAConfig(keep=[keep] * layers, score=score, aggregate=agg)
        pred, flops, full, padded, secs = evaluate(model, batches, fca, args.pad_to)
        assert full == full_flops
        print(f"| {keep} | {score} | {agg} | {np.mean(pred == labels):.4f} | {np.mean(pred == full_pred):.4f} | "
              f"{flops / full:.3f} | {flops / padded:.3f} | {secs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
