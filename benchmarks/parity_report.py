"""Print minifca's parity with transformers (float32) on the shipped checkpoints, both CPU backends:
all-MiniLM-L6-v2 on the parity sentences (tests/data/parity_sentences.json, as tests/test_parity.py
runs them: one padded batch), and the SST-2 fine-tune on all 872 dev sentences (logits, predictions,
accuracy). Needs torch + transformers.
Usage, from the repository root: python benchmarks/parity_report.py
"""
import json
from pathlib import Path

import numpy as np
import torch
import transformers

import minifca
from minifca.assets import shared_path
from minifca.data import load_data

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = json.loads((ROOT / "tests" / "data" / "parity_sentences.json").read_text(encoding="utf-8"))


def torch_reference(folder, head="classifier"):
    """The transformers model of a checkpoint folder, in float32, eval mode (as the parity tests build it)."""
    cls = transformers.BertForSequenceClassification if head else transformers.BertModel
    return cls.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager").eval()


def torch_out(tm, enc):
    with torch.no_grad():
        return tm(input_ids=torch.from_numpy(enc.input_ids), attention_mask=torch.from_numpy(enc.attention_mask),
                  token_type_ids=torch.from_numpy(enc.token_type_ids))


minilm = minifca.default_model_path()
tm = torch_reference(minilm, head=None)
for backend in ("numpy", "numba"):
    m = minifca.from_pretrained(minilm, backend=backend)
    enc = m.tokenize(SENTENCES)
    ours, ref = m(enc), torch_out(tm, enc).last_hidden_state.numpy()
    valid = enc.attention_mask > 0
    diff = np.abs(ours.last_hidden_state - ref)[valid].max()
    w = enc.attention_mask[..., None]
    pooled = lambda h: (h * w).sum(1) / w.sum(1)
    a, b = pooled(ours.last_hidden_state), pooled(ref)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    print(f"all-MiniLM-L6-v2 {backend}: {len(SENTENCES)} sentences, last_hidden_state max abs diff {diff:.2e}, "
          f"mean-pooled cosine min {cos.min():.9f}")

sst2 = shared_path("sst2_model")
dev = load_data(shared_path("sst2_dev"))
texts, labels = dev.texts, np.array(dev.labels)
tm = torch_reference(sst2)
for backend in ("numpy", "numba"):
    m = minifca.from_pretrained(sst2, backend=backend)
    ours, ref = [], []
    for i in range(0, len(texts), 64):
        enc = m.tokenize(texts[i:i + 64])
        ours.append(m(enc).logits)
        ref.append(torch_out(tm, enc).logits.numpy())
    ours, ref = np.concatenate(ours), np.concatenate(ref)
    print(f"SST-2 fine-tune {backend}: {len(texts)} dev sentences, logits max abs diff {np.abs(ours - ref).max():.2e}, "
          f"same predictions {int((ours.argmax(1) == ref.argmax(1)).sum())}/{len(texts)}, accuracy "
          f"{(ours.argmax(1) == labels).mean():.6f} (transformers {(ref.argmax(1) == labels).mean():.6f})")
