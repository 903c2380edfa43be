"""The distillation objective on a random sample of SST-2 training sentences, for checkpoints side by side.

CE (gold labels) + KL to the teacher (the shared fine-tune, no FCA), both with the FCA schedule on, through
the numba forward, and FCA's accuracy on the same sentences: did `minifca distill` improve what it optimises?

    python benchmarks/distill_train_loss.py ../shared/models/minilm-l6-sst2 weights/sst2_050_hard_distilled-step400
"""
import sys
from pathlib import Path

import numpy as np

import minifca
from minifca import FCAConfig, grad

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def main(paths, n=512, seed=123):
    fca = FCAConfig.load(ROOT / "docs" / "schedules" / "sst2_050_hard.json")
    lines = (SHARED / "data" / "sst2" / "train.tsv").read_text().splitlines()[1:]
    idx = np.random.default_rng(seed).choice(len(lines), n, replace=False)
    rows = [lines[i].rsplit("\t", 1) for i in idx]
    texts, labels = [r[0] for r in rows], np.array([int(r[1]) for r in rows])
    teacher = minifca.from_pretrained(SHARED / "models" / "minilm-l6-sst2")
    for path in paths:
        m = minifca.from_pretrained(path)
        loss, acc = [], []
        for i in range(0, n, 64):
            enc = m.tokenize(texts[i:i + 64])
            s, t = m(enc, fca=fca).logits, teacher(enc).logits
            loss.append(grad.cross_entropy(s, labels[i:i + 64])[0] + grad.kl_to_teacher(s, t)[0])
            acc.append((s.argmax(1) == labels[i:i + 64]).mean())
        print(f"{path}: CE + KL {np.mean(loss):.4f}, FCA accuracy {np.mean(acc):.4f} on {n} training sentences")


if __name__ == "__main__":
    main(sys.argv[1:])
