"""The keep x score x aggregate table of docs/fca_table.md, now a thin caller of `minifca ablate`.

    python scripts/fca_table.py [--model DIR] [--data dev.tsv] [--batch 64] [--pad-to 64] [--backend numpy]
                                [--out weights/fca_table]

Uniform keep ratios 0.7, 0.5, 0.3 on every layer from layer 0, scores attention_received and random,
aggregates drop and weighted; prints the markdown table (FLOPs against the unpadded and the padded full
model). The same as:

    minifca ablate --model DIR --data dev.tsv --scores attention_received,random --aggregates drop,weighted \\
        --keep 0.7,0.5,0.3 --out weights/fca_table
"""
from __future__ import annotations

import argparse
from pathlib import Path

import minifca
from minifca import evaluate

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "minilm-l6-sst2"))
    ap.add_argument("--data", default=str(SHARED / "data" / "sst2" / "dev.tsv"))
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--pad-to", type=int, default=64)
    ap.add_argument("--out", default="weights/fca_table", help="results.csv/md and plots go here (resumable)")
    args = ap.parse_args(argv)
    model = minifca.from_pretrained(args.model, backend=args.backend)
    rows = evaluate.grid(model.config.num_hidden_layers, ["attention_received", "random"], ["drop", "weighted"],
                         [0.7, 0.5, 0.3])
    table = evaluate.ablate(model, evaluate.load_data(args.data), rows, args.out, args.batch, args.pad_to)
    print(evaluate.results_table(table, args.pad_to))


if __name__ == "__main__":
    main()
