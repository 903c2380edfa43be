"""backend="cuda" on a GPU: parity with the NumPy reference and speed against torch CUDA fp32.

    python benchmarks/bench_cuda.py [--model PATH] [--random-bert-base] [--sentences FILE]
                                 [--batch 32] [--length 128] [--keep 0.5] [--no-parity] [--json OUT]
                                 [--tiles NAME] [--matmul-only] [--profile]

Models: the checkpoint at --model (default: minifca.default_model_path(), all-MiniLM-L6-v2) and,
with --random-bert-base, a random-weight bert-base (12 x 768, 12 heads, 3072) written by
transformers into a temporary folder. Batches: the first --batch lines of --sentences tokenized
(padded to the longest), and --batch random token ids x --length, all valid. --profile adds the
time per kernel of one full and one FCA forward; --matmul-only times the matmul per tile choice.
The benchmark grid (bert-base and MiniLM shapes at several batch shapes) is `minifca bench --backend cuda`.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import minifca  # noqa: E402
from minifca import bench  # noqa: E402
from minifca.fca import FCAConfig  # noqa: E402
from minifca.kernels import cuda as cuda_mod  # noqa: E402
from minifca.bench_cuda import bench_cuda, bench_matmul, format_rows, kernel_profile, parity  # noqa: E402

PARITY_RULES = [None, FCAConfig(keep=0.5), FCAConfig(keep=0.3, score="cls_attention", aggregate="drop"),
                FCAConfig(keep=0.5, score="attention_entropy", aggregate="clusters", clusters=2),
                FCAConfig(keep=0.5, score="hidden_norm", aggregate="mean", proportional_attention=True),
                FCAConfig(keep=0.5, score="random", aggregate="similarity", clusters=2)]


def random_bert_base(folder, seed=0):
    return bench.write_random_checkpoint(folder, seed, perturb=0.02)   # bert-base: BertConfig's defaults


def batches(model, sentences, batch, length, seed=0):
    out = {}
    if sentences and model.tokenizer is not None:
        lines = [s for s in Path(sentences).read_text().splitlines() if s.strip()][:batch]
        enc = model.tokenize(lines, max_length=length, truncation=True)
        out[f"{len(lines)} SST-2 dev sentences"] = (np.asarray(enc.input_ids, np.int64),
                                                    np.asarray(enc.attention_mask, np.int64))
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, model.config.vocab_size, (batch, length))
    ids[:, 0], ids[:, -1] = 101, 102
    out[f"random ids {batch} x {length}"] = (ids.astype(np.int64), np.ones_like(ids))
    return out


def run(folder, name, args):
    model = minifca.from_pretrained(folder, backend="cuda")
    if args.tiles != cuda_mod.DEFAULT_TILES:
        model._cuda_ops = model.ops = cuda_mod.CudaOps(model.params, tiles=args.tiles)
    res = {"model": name, "parity": [], "bench": []}
    data = batches(model, args.sentences, args.batch, args.length)
    if args.parity:
        for label, (ids, mask) in data.items():
            ids, mask = ids[:8], mask[:8]
            for fca in PARITY_RULES:
                p = parity(model, ids, mask, fca)
                p.update(batch=label + " (first 8)", fca=None if fca is None else f"{fca.score}/{fca.aggregate} keep={fca.keep}")
                res["parity"].append(p)
                print(name, json.dumps(p), flush=True)
    for label, (ids, mask) in data.items():
        if args.profile:
            for fca in (None, FCAConfig(keep=args.keep)):
                p = kernel_profile(model, ids, mask, fca)
                p["data"] = label
                res.setdefault("profile", []).append(p)
                print(name, json.dumps(p), flush=True)
        b = bench_cuda(model, ids, mask, {"": FCAConfig(keep=args.keep)}, repeats=args.repeats)
        b["data"] = label
        res["bench"].append(b)
        print(f"\n{name}, {label}\n{format_rows(b)}", flush=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--random-bert-base", action="store_true")
    ap.add_argument("--sentences", default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-parity", dest="parity", action="store_false")
    ap.add_argument("--json", default=None)
    ap.add_argument("--tiles", default=cuda_mod.DEFAULT_TILES, choices=list(cuda_mod.TILES))
    ap.add_argument("--profile", action="store_true", help="also the time per kernel of one full and one FCA forward")
    ap.add_argument("--matmul-only", action="store_true", help="time the matmul kernel per tile size, then stop")
    args = ap.parse_args(argv)
    if args.matmul_only:
        rows = [bench_matmul(M, K, N, t) for t in cuda_mod.TILES
                for M, K, N in ((4096, 768, 3072), (4096, 3072, 768), (4096, 384, 1152), (128, 768, 768))]
        for r in rows:
            print(json.dumps(r), flush=True)
        return rows
    results = [run(args.model or minifca.default_model_path(), "all-MiniLM-L6-v2", args)]
    if args.random_bert_base:
        with tempfile.TemporaryDirectory() as tmp:
            results.append(run(random_bert_base(tmp), "random bert-base", args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
