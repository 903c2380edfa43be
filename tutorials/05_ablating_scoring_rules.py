# %% [markdown]
# # 5. Ablating scoring rules
#
# Tutorial 2 showed that the scoring rules rank tokens differently. Here we measure what that costs:
# each rule of `fca.SCORES` runs FCA on a sample of the SST-2 dev set at several retention ratios,
# and we plot accuracy against the FLOPs kept (the trade-off curve). Then we add a rule of our own
# with `minifca.register_score`, in a few lines, and see where it lands.
#
# | step | function |
# |---|---|
# | the configuration | `fca.FCAConfig(keep=r, score=rule)` |
# | the rules | `fca.SCORES` (`attention_received`, `cls_attention`, `hidden_norm`, `attention_entropy`, `random`) |
# | one forward | `Model.__call__` → `reference.bert_forward` → `fca.FCAState.reduce` → `fca.reduce_sequence` |
# | cost | `Output.flops` / `Output.flops_full` (`flops.model_flops`, unpadded) and `Output.flops_full_padded` |
# | a new rule | `minifca.register_score` (with its facts, e.g. `batched=True`, in the same call) |
#
# FCA is applied to the fine-tuned checkpoint **without re-training**, so accuracy falls as the
# ratio drops; the question is how fast, and for which rule. (The paper re-trains with FCA in place and
# loses much less.)

# %%
import matplotlib.pyplot as plt
import numpy as np

import minifca
from minifca import fca
from _setup import FAST, SST2_MODEL, read_sst2

model = minifca.from_pretrained(SST2_MODEL, backend="numpy")   # the reference (default: "numba")
texts, labels = read_sst2(limit=40 if FAST else 300)
enc = model.tokenize(texts)
ratios = [0.3, 0.6] if FAST else [0.2, 0.35, 0.5, 0.65, 0.8]
print(f"{len(texts)} dev sentences, {int(enc.attention_mask.sum())} tokens; keep ratios {ratios}")

# %% [markdown]
# ## The loop
#
# `run` classifies the sample in batches of 64 (the `Encoding` slices itself) and returns the
# predictions and the FLOPs of the run as a share of the full model's over the same sentences: without
# padding (the honest baseline, tutorial 4) and padded to 64 (the paper's). The full model is the
# reference point.

# %%
def run(config):
    preds, used, full, padded = [], 0, 0, 0
    for i in range(0, len(texts), 64):
        out = model(enc[i:i + 64], fca=config, pad_to=64)
        preds.append(out.logits.argmax(1))
        used, full, padded = used + out.flops, full + out.flops_full, padded + out.flops_full_padded
    return np.concatenate(preds), used / full, used / padded


full_preds, _, _ = run(None)
full_acc = float(np.mean(full_preds == labels))
print(f"full model: accuracy {full_acc:.3f}")


def ablate(rule):
    """Accuracy, agreement with the full model and FLOPs ratio at every keep ratio."""
    rows = []
    for r in ratios:
        preds, flops_ratio, padded_ratio = run(fca.FCAConfig(keep=r, score=rule))
        rows.append({"keep": r, "acc": float(np.mean(preds == labels)), "agree": float(np.mean(preds == full_preds)),
                     "flops": flops_ratio, "padded": padded_ratio, "preds": preds})
    return rows


def table(results):
    print(f"{'rule':20s} {'keep':>5s} {'accuracy':>9s} {'agreement':>10s} {'FLOPs':>7s} {'vs padded':>10s}")
    for rule, rows in results.items():
        for row in rows:
            print(f"{rule:20s} {row['keep']:5.2f} {row['acc']:9.3f} {row['agree']:10.1%} {row['flops']:7.1%} "
                  f"{row['padded']:10.1%}")


results = {rule: ablate(rule) for rule in fca.SCORES}
table(results)

# %% [markdown]
# ## The trade-off plot
#
# One curve per rule: FLOPs kept (share of the unpadded full model) on x, accuracy on y. Better rules
# sit higher at the same cost. `random` is the floor a rule should beat; the printout under the plot
# names any rule that falls below it.

# %%
def plot(results, highlight=None):
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for rule, rows in results.items():
        style = dict(lw=3, ls="--", color="black") if rule == highlight else dict(lw=1.5, ls="-")
        ax.plot([r["flops"] for r in rows], [r["acc"] for r in rows], marker="o", label=rule, ms=4, **style)
    ax.plot([1.0], [full_acc], "k*", ms=12, label="full model")
    ax.set_xlabel("FLOPs, share of the full model (unpadded)")
    ax.set_ylabel(f"accuracy on {len(texts)} SST-2 dev sentences")
    ax.set_title("FCA without re-training: keep ratio swept per scoring rule", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()


plot(results)
best = max(results, key=lambda rule: np.mean([r["acc"] for r in results[rule]]))
print(f"best mean accuracy over the sweep: {best}")
for rule, rows in results.items():
    below = [r["keep"] for r, f in zip(rows, results["random"]) if r["acc"] < f["acc"]]
    if below:
        print(f"{rule} is below random at keep {below}")

# %% [markdown]
# ## A rule of your own
#
# A scoring rule is a function of the layer's attention statistics (`stats`: `received`, `cls`,
# `entropy`, one number per unit, from `reference.attention_stats`), the units' hidden states `x`
# `[n, H]`, their keys `[n, H]` and a seeded random generator; it returns one score per unit, higher =
# keep. `register_score` puts it into `fca.SCORES` under a name, and from then on
# `FCAConfig(score=name)` (and the command line's `--fca-score name`) can use it.
#
# Adding a rule happens in this one place. What the fast paths need to know about it is said in the
# same line: `batched=True` promises that the function also scores a whole batch at once (statistics
# `[B, n]` in, scores `[B, n]` out, reading no keys and no random numbers; the last axis is the
# units). With that fact the batched NumPy path, the Numba backend's compiled reduction and the GPU
# backend all run the rule (`fca.batchable` says so), and no table anywhere else in minifca changes.
# Without it the rule still works, one sequence at a time.
#
# The idea to try: a unit matters if many units attend to it (the paper's score) **and** if `[CLS]`
# attends to it, since `[CLS]` is what the classifier reads. Normalise the first to the scale of the
# second and add them.

# %%
@minifca.register_score("received_plus_cls", batched=True)
def received_plus_cls(stats, x, keys, rng):
    """Attention received (normalised to sum to 1 in each sequence) plus the attention [CLS] pays."""
    r = stats["received"]                                             # [n] (or [B, n] for a batch)
    return r / np.maximum(r.sum(-1, keepdims=True), 1e-9) + stats["cls"]  # [n] (or [B, n])


print("rules now:", list(fca.SCORES))
print("its facts:", fca.score_facts("received_plus_cls"))
print("batched on every backend:", fca.batchable(fca.FCAConfig(score="received_plus_cls")))
results["received_plus_cls"] = ablate("received_plus_cls")
table({"received_plus_cls": results["received_plus_cls"], "attention_received": results["attention_received"]})

# %%
plot(results, highlight="received_plus_cls")
mine = np.mean([r["acc"] for r in results["received_plus_cls"]])
paper = np.mean([r["acc"] for r in results["attention_received"]])
print(f"mean accuracy over the sweep: received_plus_cls {mine:.3f}, attention_received {paper:.3f}")

# %% [markdown]
# Whether the new rule wins depends on the sample. One sentence moves the accuracy by `1 / len(texts)`,
# and two rules that disagree on a handful of sentences are within noise of each other: the printout
# below says how many sentences the two rules actually classify differently. For a real comparison use
# the whole dev set and several schedules; the loop above is all it takes.

# %%
for r, a, b in zip(ratios, results["received_plus_cls"], results["attention_received"]):
    differ = int(np.sum(a["preds"] != b["preds"]))
    gap = round(abs(a["acc"] - b["acc"]) * len(texts))
    print(f"keep {r:.2f}: accuracy {a['acc']:.3f} vs {b['acc']:.3f}, a gap of {gap} correct answers; "
          f"the two rules classify {differ} of {len(texts)} sentences differently")
