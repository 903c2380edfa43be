# %% [markdown]
# # 2. Where attention goes
#
# FCA decides which tokens stay "fine" by how much attention they receive. Before trusting that
# rule, look at the attention itself. This tutorial walks:
#
# | step | function |
# |---|---|
# | attention probabilities of every layer | `reference.attention` (and `Model.forward(output_attentions=True)`) |
# | the statistics FCA scores with | `reference.attention_stats` → `received`, `cls`, `entropy` |
# | the scoring rules | `fca.SCORES`: `attention_received`, `cls_attention`, `hidden_norm`, `attention_entropy`, `random` |
# | what a rule keeps | `fca.select` |
#
# on the SST-2 fine-tune of tutorial 1.

# %%
import matplotlib.pyplot as plt
import numpy as np

import minifca
from minifca import fca, reference
from _setup import FAST, SST2_MODEL, read_sst2

np.set_printoptions(precision=3, suppress=True, linewidth=110)
model = minifca.from_pretrained(SST2_MODEL, backend="numpy")   # the reference (default: "numba")
cfg = model.config
sentence = "we know the plot 's a little crazy , but it held my interest from start to finish ."
enc = model.tokenize([sentence])
tokens = enc.tokens[0]
out = model(enc, output_attentions=True)
print(len(tokens), "tokens:", " ".join(tokens))
print("prediction:", model.classify([sentence])[0][0])
print("attentions:", len(out.attentions), "layers of", out.attentions[0].shape, "(batch, head, query, key)")

# %% [markdown]
# ## Attention maps
#
# Row `i` of a map is where query token `i` looks; each row sums to 1. Averaged over the 12 heads
# (`Ā = mean_h A`, what FCA scores with), this sentence shows the usual progression: in the first
# layers a token looks at itself, its neighbours (the bright diagonals) and `[CLS]`; in the middle
# layers most rows pour their attention onto `[CLS]`, a "no-op" sink (Clark et al., 2019); in the
# last layer attention gathers on the few words that carry the sentiment.

# %%
fig, axes = plt.subplots(2, 3, figsize=(11, 7.4))
for layer, ax in enumerate(axes.flat):
    abar = out.attentions[layer][0].mean(0)                          # [h, n, n] -> [n, n]
    ax.imshow(abar, cmap="viridis", vmin=0, vmax=0.5)
    ax.set_title(f"layer {layer}, head mean", fontsize=9)
    ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
    ax.set_yticks(range(len(tokens)), tokens, fontsize=6)
fig.tight_layout()

# %% [markdown]
# Single heads are much sharper than their mean. The 12 heads of layer 2:

# %%
fig, axes = plt.subplots(2, 6, figsize=(11, 4))
for head, ax in enumerate(axes.flat):
    ax.imshow(out.attentions[2][0, head], cmap="viridis", vmin=0, vmax=1)
    ax.set_title(f"head {head}", fontsize=8)
    ax.set_xticks([]), ax.set_yticks([])
fig.suptitle("layer 2, one map per head (query rows, key columns)", fontsize=10)
fig.tight_layout()

# %% [markdown]
# ## The score FCA uses: attention received
#
# `reference.attention_stats` turns one layer's probabilities into the numbers the scoring rules read.
# The paper's score is the attention a unit *receives* from the other units,
# `s_j = Σ_i Ā[i, j] − Ā[j, j]` (a column sum without the diagonal). Since every row of `Ā`
# sums to 1, the scores of a sentence add up to `n − trace(Ā)`: a check we can run.

# %%
received = []
for layer in range(cfg.num_hidden_layers):
    stats = reference.attention_stats(out.attentions[layer], out.mask)   # {name: [B, n]}
    received.append(stats["received"][0])
    abar = out.attentions[layer][0].mean(0)
    assert np.isclose(received[-1].sum(), len(tokens) - np.trace(abar), atol=1e-4)
received = np.array(received)                                          # [layers, n]
print("attention received, per layer (columns: tokens)")
print(" " * 10 + " ".join(f"{t[:6]:>6}" for t in tokens))
for layer, row in enumerate(received):
    print(f"layer {layer}:  " + " ".join(f"{v:6.2f}" for v in row))
top = [[tokens[j] for j in np.argsort(-row)[:5]] for row in received]
for layer, t in enumerate(top):
    print(f"layer {layer} top 5: {t}")

# %%
fig, ax = plt.subplots(figsize=(10, 3.2))
im = ax.imshow(received, cmap="magma", aspect="auto")
ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=8)
ax.set_yticks(range(cfg.num_hidden_layers), [f"layer {l}" for l in range(cfg.num_hidden_layers)], fontsize=8)
ax.set_title("attention received (the paper's score), per layer and token", fontsize=10)
fig.colorbar(im, ax=ax, fraction=0.03)
fig.tight_layout()

# %% [markdown]
# ## Do the scoring rules agree?
#
# `fca.SCORES` holds the rules FCA can rank units with. Each is a small function of the
# statistics above, the unit's hidden state `x` (after attention's Add & LayerNorm, where FCA steps in)
# and its key vector. To compare them on real data we run a sample of SST-2 dev sentences through the
# layers by hand (the loop of tutorial 1, keeping what each FCA layer would see), score every
# sentence at every layer with every rule, and compare the rankings two ways:
#
# - **Spearman rank correlation** of the scores (1 = the same order, 0 = unrelated);
# - **top-k overlap**: the share of the units `fca.select` keeps at `keep = 0.5` that both rules keep.
#
# `[CLS]` is always kept, so it is left out of both.

# %%
texts, _ = read_sst2(limit=24 if FAST else 200)
rules = list(fca.SCORES)
enc_s = model.tokenize(texts)
p_all, eps = model.params, cfg.layer_norm_eps
x = reference.embeddings(enc_s.input_ids, enc_s.token_type_ids, **p_all["embeddings"], eps=eps)
mask = enc_s.attention_mask.astype(np.float32)
seen = []                                              # per layer: (stats, x after attention, keys)
for p in p_all["layers"]:
    a, _, stats, keys = reference.attention(x, mask, None, **p["attn"], n_head=cfg.num_attention_heads, want_stats=True)
    h = reference.add_layer_norm(a, x, **p["attn_ln"], eps=eps)
    seen.append((stats, h, keys))
    x = reference.add_layer_norm(reference.ffn(h, **p["ffn"], act=cfg.hidden_act), h, **p["ffn_ln"], eps=eps)
print(f"{len(texts)} sentences, {int(mask.sum())} tokens, rules: {rules}")

# %%
def ranks(s):
    return np.argsort(np.argsort(s, kind="stable"), kind="stable").astype(float)


def spearman(a, b):
    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1]) if ra.std() > 0 and rb.std() > 0 else 0.0


R = len(rules)
corr, overlap, count = np.zeros((R, R)), np.zeros((R, R)), 0
for layer, (stats, h, keys) in enumerate(seen):
    for b in range(len(texts)):
        valid = np.flatnonzero(mask[b] > 0)
        if len(valid) < 5:
            continue
        st = {k: v[b, valid] for k, v in stats.items()}
        rng = np.random.default_rng([layer, b])
        s = [np.asarray(fca.SCORES[r](st, h[b, valid], keys[b, valid], rng), float) for r in rules]
        k = int(np.ceil(0.5 * len(valid)))
        kept = [set(fca.select(si, k)) - {0} for si in s]
        for i in range(R):
            for j in range(R):
                corr[i, j] += spearman(s[i][1:], s[j][1:])
                overlap[i, j] += len(kept[i] & kept[j]) / (k - 1)
        count += 1
corr, overlap = corr / count, overlap / count
print(f"averaged over {count} (sentence, layer) pairs\n")
for title, m in (("Spearman rank correlation", corr), ("top-k overlap at keep=0.5", overlap)):
    print(title)
    print(" " * 19 + " ".join(f"{r[:9]:>9}" for r in rules))
    for r, row in zip(rules, m):
        print(f"{r:>18} " + " ".join(f"{v:9.2f}" for v in row))
    print()

# %% [markdown]
# What to read from the tables: `attention_received` and `cls_attention` both measure attention
# *paid to* a unit, so they should agree most; `hidden_norm` and `attention_entropy` look at other
# things (the unit's own state, how widely it looks); `random` should sit at 0 correlation and at the
# chance overlap, about one half when half is kept. The printout below reads the tables for you.
# Tutorial 5 measures what these disagreements cost in accuracy.

# %%
pairs = [(corr[i, j], rules[i], rules[j]) for i in range(R) for j in range(i + 1, R)]
best, worst = max(pairs), min(pairs)
print(f"most alike:   {best[1]} / {best[2]} (Spearman {best[0]:.2f})")
print(f"most opposed: {worst[1]} / {worst[2]} (Spearman {worst[0]:.2f})")
print(f"random vs the paper's rule: Spearman {corr[rules.index('random'), rules.index('attention_received')]:.2f}, "
      f"top-k overlap {overlap[rules.index('random'), rules.index('attention_received')]:.2f}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
for ax, m, title, lo in ((axes[0], corr, "Spearman rank correlation", -1), (axes[1], overlap, "top-k overlap (keep 0.5)", 0)):
    ax.imshow(m, cmap="coolwarm", vmin=lo, vmax=1)
    ax.set_xticks(range(R), rules, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(R), rules, fontsize=8)
    for i in range(R):
        for j in range(R):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(title, fontsize=10)
fig.tight_layout()
