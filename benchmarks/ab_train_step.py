"""One training step (forward, backward, AdamW) of minifca.grad against torch autograd, side by side.

Same checkpoint, same batch (real SST-2 training sentences of similar length), dropout 0.1 in both,
cross-entropy loss, AdamW step. The two alternate, `--rounds` times, and each side's best is reported
with the ratio of step rates (minifca / torch: > 1 means minifca is faster). minifca runs with NumPy alone
and with the Numba kernels of minifca.kernels.cpu_grad (what distill uses), each also with the FCA schedule;
--profile prints a profile of minifca's step.

    OPENBLAS_CORETYPE= OPENBLAS_L2_SIZE= python benchmarks/ab_train_step.py [--batch 32] [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import numpy as np

from minifca.assets import shared_path

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(shared_path("sst2_model")))
    ap.add_argument("--data", default=str(shared_path("sst2_train")))
    ap.add_argument("--schedule", default=str(ROOT / "docs" / "schedules" / "sst2_050_hard.json"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--words", type=int, default=20, help="sentences of about this many words (the batch's length)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    import minifca
    from minifca import FCAConfig, grad
    from minifca.optim import AdamW
    import torch
    import transformers
    torch.set_num_threads(args.threads)

    lines = Path(args.data).read_text().splitlines()[1:]
    rows = [r.rsplit("\t", 1) for r in lines]
    rows = sorted(rows, key=lambda r: abs(len(r[0].split()) - args.words))[:args.batch]
    texts, labels = [r[0] for r in rows], np.array([int(r[1]) for r in rows])
    m = minifca.from_pretrained(args.model, backend="numpy")
    enc = m.tokenize(texts)
    print(f"batch {enc.input_ids.shape[0]} x {enc.input_ids.shape[1]} tokens ({int(enc.attention_mask.sum())} "
          f"valid), {args.threads} threads", file=sys.stderr)
    fca = FCAConfig.load(args.schedule)

    from minifca.kernels import cpu_grad
    params = grad.trainable(m.params)
    opt = AdamW(dict(grad.leaves(params)), lr=1e-5)
    fused = AdamW(dict(grad.leaves(params)), lr=1e-5, update=cpu_grad.adamw_update)

    def ours(f=None, ops=None):
        rng = np.random.default_rng(0)
        out, cache = grad.forward(params, m.config, enc.input_ids, enc.attention_mask, enc.token_type_ids, fca=f,
                                  dropout=0.1, rng=rng, ops=ops)
        _, d = grad.cross_entropy(out["logits"], labels)
        g, _ = grad.backward(params, m.config, cache, {"logits": d})
        (opt if ops is None else fused).step(dict(grad.leaves(g)))

    tm = transformers.BertForSequenceClassification.from_pretrained(args.model, attn_implementation="eager").train()
    topt = torch.optim.AdamW(tm.parameters(), lr=1e-5)
    t_ids, t_mask, t_tt = (torch.from_numpy(a) for a in (enc.input_ids, enc.attention_mask, enc.token_type_ids))
    t_labels = torch.from_numpy(labels)

    def theirs():
        topt.zero_grad()
        loss = torch.nn.functional.cross_entropy(tm(input_ids=t_ids, attention_mask=t_mask,
                                                    token_type_ids=t_tt).logits, t_labels)
        loss.backward()
        topt.step()

    cases = {"torch autograd": theirs, "minifca.grad": ours, "minifca.grad + Numba": lambda: ours(None, cpu_grad),
             "minifca.grad + FCA": lambda: ours(fca), "minifca.grad + Numba + FCA": lambda: ours(fca, cpu_grad)}
    best = dict.fromkeys(cases, float("inf"))
    for f in cases.values():
        f()                                                          # warm-up
    for _ in range(args.rounds):
        for name, f in cases.items():
            t = time.perf_counter()
            f()
            best[name] = min(best[name], time.perf_counter() - t)
    base = best["torch autograd"]
    for name, s in best.items():
        print(f"{name:28s} {s * 1e3:8.0f} ms/step   rate vs torch {base / s:.2f}x")
    if args.profile:
        for label, f in (("NumPy, no FCA", ours), ("Numba kernels, no FCA", lambda: ours(None, cpu_grad))):
            prof = cProfile.Profile()
            prof.runcall(f)
            print(f"\nminifca.grad step ({label}), by own time:")
            pstats.Stats(prof).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
