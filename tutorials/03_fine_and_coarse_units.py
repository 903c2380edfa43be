# %% [markdown]
# # 3. Fine and coarse units
#
# FCA (Zhao et al., ACL 2022) shortens the sequence inside the network. At an FCA layer, right after
# attention and its Add & LayerNorm, it
#
# 1. **scores** every unit (by default the attention it receives, tutorial 2),
# 2. **selects** `[CLS]` and the `k_l − 1` best others: these stay as they are, the *fine* units,
# 3. **aggregates** the rest into one *coarse* unit, a weighted average with weights `softmax(scores)`,
#
# and only the shortened sequence goes through the FFN and the later layers. This tutorial follows
# one sentence through that, with
#
# | step | function |
# |---|---|
# | the configuration | `fca.FCAConfig` (`keep`, `score`, `aggregate`, `proportional_attention`) and `FCAConfig.k` |
# | one layer by hand | `reference.attention(..., want_stats=True)`, `fca.SCORES`, `fca.select`, `fca.AGGREGATES`, `fca.reduce_sequence`, `fca.merge` |
# | the whole model | `reference.bert_forward` → `fca.FCAState.reduce` (with `trace=True`) |
# | a picture | the trace, `minifca.explain.picture`, `minifca.explain.print_picture` |
#
# and then the same with `aggregate="drop"` (PoWER-BERT: the rest is thrown away) for contrast.

# %%
import matplotlib.pyplot as plt
import numpy as np

import minifca
from minifca import fca, reference
from minifca.explain import picture, print_picture
from _setup import SST2_MODEL

np.set_printoptions(precision=3, suppress=True, linewidth=110)
model = minifca.from_pretrained(SST2_MODEL, backend="numpy")   # the reference (default: "numba")
cfg = model.config
sentence = "we know the plot 's a little crazy , but it held my interest from start to finish ."
enc = model.tokenize([sentence])
tokens = enc.tokens[0]
n_tokens = len(tokens)
print(n_tokens, "tokens:", " ".join(tokens))

# %% [markdown]
# ## The retention configuration
#
# `keep` gives, per layer, the share of the sentence's own length kept as fine units:
# `k_l = ceil(keep_l × n_tokens)`, `[CLS]` included. FCA here is applied to a fine-tuned checkpoint
# *without re-training*, so a gentle linear decay is a reasonable start.

# %%
schedule = fca.FCAConfig(keep=[0.8, 0.7, 0.6, 0.5, 0.4, 0.3])      # score="attention_received", aggregate="weighted"
print(schedule)
print("fine units per layer:", [schedule.k(layer, n_tokens, n_tokens) for layer in range(cfg.num_hidden_layers)])

# %% [markdown]
# ## Layer 0, by hand
#
# Run the attention sub-layer (asking for the statistics the scores need), then score, select and
# aggregate with the functions `FCAState.reduce` calls for each sequence of a batch.

# %%
p, eps = model.params["layers"][0], cfg.layer_norm_eps
mask = enc.attention_mask.astype(np.float32)
x0 = reference.embeddings(enc.input_ids, enc.token_type_ids, **model.params["embeddings"], eps=eps)
a, probs, stats, keys = reference.attention(x0, mask, None, **p["attn"], n_head=cfg.num_attention_heads, want_stats=True)
x = reference.add_layer_norm(a, x0, **p["attn_ln"], eps=eps)[0]      # [n, H]: FCA steps in here
st = {name: v[0] for name, v in stats.items()}                       # {name: [n]}
scores = fca.SCORES[schedule.score](st, x, keys[0], None)            # [n]
k = schedule.k(0, n_tokens, n_tokens)
fine = fca.select(scores, k)                                         # [k] indices, in sequence order
rest = np.setdiff1d(np.arange(n_tokens), fine)                       # [m] the units to aggregate
print(f"k = {k} fine units:", [tokens[i] for i in fine])
print("aggregated:", [(tokens[i], round(float(scores[i]), 3)) for i in rest], "(token, score)")

# %% [markdown]
# The lowest-scoring units go into the coarse unit. Its weights are `softmax` of their scores
# (`AGGREGATES["weighted"]`, the paper's rule); with scores this close the weights are nearly
# equal. `fca.merge` then builds the new sequence, fine units first, and adds up the sizes:
# each unit remembers how many input tokens it stands for.

# %%
groups, w = fca.AGGREGATES[schedule.aggregate](scores[rest], np.ones(len(rest)), keys[0, rest], schedule.clusters)
print("groups:", groups, "weights:", w.round(3), "sum:", w.sum())
sizes = np.ones(n_tokens, np.float32)
new_x, new_sizes, W = fca.merge(x, sizes, fine, rest, groups, w)
print("units:", x.shape[0], "->", new_x.shape[0], "| sizes:", new_sizes)
coarse = (w[:, None] * x[rest]).sum(0)                              # the coarse unit, written out
print("coarse unit == sum_j w_j x_j:", np.allclose(new_x[-1], coarse, atol=1e-6))
same = fca.reduce_sequence(schedule, 0, x, sizes, st, keys[0], None, n_tokens)
print("reduce_sequence gives the same split:", all(np.array_equal(u, v) for u, v in zip(same, (fine, rest, groups, w))))

# %% [markdown]
# ## All layers: the trace
#
# `model(enc, fca=schedule, trace=True)` runs `reference.bert_forward` with `FCAState.reduce` at every
# FCA layer and records, per layer, every unit's members (input tokens) and their weights.
# A coarse unit made at layer 0 is a unit like any other at layer 1: it is scored again and may
# stay (a merged unit kept among the fine ones), or be folded into the next coarse unit.
# `minifca.explain.picture` collects the trace into a per-layer table and `print_picture` draws it
# (this is what `minifca explain "…"` prints): one column per input token, one row per layer.

# %%
print_picture(picture(model, sentence, schedule))

# %% [markdown]
# The raw trace of the last layer, with each member's weight inside its unit. Weights multiply
# through the layers: a token that holds a quarter of a coarse unit, which in turn gets weight 0.3
# in a later coarse unit, counts for 0.075 of that later unit.

# %%
out = model(enc, fca=schedule, trace=True)
for u in out.trace[-1][0]:
    members = ", ".join(f"{tokens[t]} {wt:.3f}" for t, wt in zip(u["tokens"], u["weights"]))
    print(f"{u['kind']:6s} size {len(u['tokens']):2d}: {members}")
print("sizes:", out.sizes[0], "| they add up to the", n_tokens, "input tokens:", out.sizes[0].sum() == n_tokens)

# %% [markdown]
# ## The same with `drop`
#
# PoWER-BERT's rule selects the same way but throws the rest away. Layer 0 keeps the same fine
# units; later selections can differ, because under FCA the coarse unit takes part in attention and
# is scored too. In the picture `·` marks a dropped token:

# %%
dropping = fca.FCAConfig(keep=schedule.keep, aggregate="drop")
print_picture(picture(model, sentence, dropping))

# %% [markdown]
# ## Size tracking and proportional attention
#
# A coarse unit of size 8 enters attention as one key. *Proportional attention* (Bolya et al.,
# Token Merging, 2023) adds `log(size_j)` to key `j`'s logits, so a merged unit draws as much
# attention as its members would have together (`FCAConfig(proportional_attention=True)`; the sizes
# also weight mean pooling, `reference.mean_pool`). What each variant does to this sentence's prediction:

# %%
variants = {"full model": None, "weighted (paper)": schedule, "weighted + proportional":
            fca.FCAConfig(keep=schedule.keep, proportional_attention=True), "drop (PoWER-BERT)": dropping}
print(f"{'':26s} {'P(positive)':>11s} {'units at the end':>17s} {'FLOPs':>8s}")
for name, f in variants.items():
    o = model(enc, fca=f)
    prob = reference.softmax(o.logits.astype(np.float64))[0, 1]
    print(f"{name:26s} {prob:11.4f} {int(o.mask.sum()):17d} {o.flops / o.flops_full:8.1%}")

# %% [markdown]
# ## One picture
#
# Each row is a layer, each column an input token. Blue: the token is a fine unit on its own.
# Orange: the token lives inside a merged unit, shaded by its weight there (darker = more). White: dropped.

# %%
def grid(trace, n):
    """[layers, n, 3] RGB: fine token blue, merged token orange by weight, dropped white."""
    img = np.ones((len(trace), n, 3))
    for layer, per_seq in enumerate(trace):
        for u in per_seq[0]:
            for t, wt in zip(u["tokens"], u["weights"]):
                if len(u["tokens"]) == 1:
                    img[layer, t] = (0.12, 0.47, 0.71)
                else:
                    s = 0.25 + 0.75 * min(1.0, wt * 2)
                    img[layer, t] = 1 - s * (1 - np.array((1.0, 0.5, 0.05)))
    return img


fig, axes = plt.subplots(2, 1, figsize=(10, 4.4))
for ax, (name, f) in zip(axes, (("weighted (FCA)", schedule), ("drop (PoWER-BERT)", dropping))):
    ax.imshow(grid(model(enc, fca=f, trace=True).trace, n_tokens), aspect="auto")
    ax.set_title(name, fontsize=10)
    ax.set_yticks(range(cfg.num_hidden_layers), [f"layer {l}" for l in range(cfg.num_hidden_layers)], fontsize=7)
    ax.set_xticks(range(n_tokens), tokens if ax is axes[1] else [""] * n_tokens, rotation=90, fontsize=8)
fig.tight_layout()
