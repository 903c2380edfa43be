# %% [markdown]
# # 6. Teaching BERT to read coarse units
#
# Tutorials 3-5 applied FCA to a checkpoint that never saw a coarse unit, and accuracy paid for it.
# The paper re-trains the model with FCA in place. minifca does that in NumPy, with a backward pass
# written by hand beside the forward (`minifca/grad.py`), and `minifca distill` on top of it. This
# tutorial derives the backward of one FCA layer, checks the whole backward against finite
# differences on a tiny model, and ends with a short distillation run.
#
# | step | function |
# |---|---|
# | the forward of one FCA layer | `reference.attention(..., want_stats=True)`, `reference.add_layer_norm`, `fca.SCORES`, `fca.reduce_sequence`, `fca.merge`; in training `grad.fca_forward` |
# | its backward | `grad.fca_backward` (gather and weighted sum), `grad.softmax_backward`, `grad.received_backward` (scores → attention), `grad.attention_backward`, `grad.layer_backward` |
# | the whole model | `grad.forward` (`reference.bert_forward` run with a `grad.Tape`), `grad.backward`, `grad.cross_entropy` |
# | the check | central differences in float64, and what a change of the selection does to them |
# | training | `distill.distill` (AdamW, cross-entropy + `grad.kl_to_teacher`) |
#
# The first part runs on a tiny random model built here in NumPy, so a forward takes a millisecond
# and can run in float64; the last part trains the shared SST-2 fine-tune.

# %%
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import minifca
from minifca import distill, fca, grad, reference
from minifca.config import BertConfig
from minifca.weights import expected_shapes, optional_shapes, to_params
from _setup import FAST, ROOT, SST2_DEV, SST2_MODEL, read_sst2, shared_path

np.set_printoptions(precision=4, suppress=True, linewidth=110)

# %% [markdown]
# ## A tiny model, in float64
#
# A `BertConfig` with hidden size 16, two heads, two layers, and random tensors of the shapes
# `weights.expected_shapes` (plus the pooler and classifier of `weights.optional_shapes`) lists,
# turned into the reference's nested parameters by `weights.to_params`, exactly as a checkpoint's
# tensors are. The weights are larger than a fresh BERT's (spread 0.3, not 0.02), so attention is not
# uniform and the scores of the units differ clearly. Everything is float64: the reference and
# `grad` compute in the dtype of the weights, and float64 leaves room for finite differences (below).
# The activation is `gelu_new` (the tanh form): the reference's exact `gelu` uses an erf
# approximation good to 1.5e-7, whose derivative the backward does not copy.

# %%
cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                 max_position_embeddings=16, hidden_act="gelu_new")
rng = np.random.default_rng(0)
shapes = {**expected_shapes(cfg), **{k: v for k, v in optional_shapes(cfg).items() if k.startswith(("pooler", "classifier"))}}
state = {}
for name, shape in shapes.items():
    if "LayerNorm.weight" in name:
        state[name] = 1.0 + 0.1 * rng.standard_normal(shape)         # LayerNorm gains near 1
    elif name.endswith(".bias") or "LayerNorm" in name:
        state[name] = 0.1 * rng.standard_normal(shape)
    else:
        state[name] = (1.0 if "embeddings" in name else 0.3) * rng.standard_normal(shape)
params = to_params(state, cfg)                                        # the reference's nested layout
B, L = 3, 10
ids = rng.integers(1, cfg.vocab_size, (B, L))
mask = np.ones((B, L), np.float32)
mask[1, 7:], mask[2, 4:] = 0, 0                                       # three lengths: 10, 7, 4 tokens
ids[mask == 0] = 0
tt = np.zeros_like(ids)
labels = np.array([1, 0, 1])
schedule = fca.FCAConfig(keep=[0.6, 0.4], aggregate="weighted", proportional_attention=True)
print(f"{sum(a.size for _, a in grad.leaves(params))} parameters in {len(grad.leaves(params))} tensors, "
      f"dtype {params['layers'][0]['attn']['q']['w'].dtype}")
print("fine units per layer, sequence 0:", [schedule.k(layer, 10, 10) for layer in range(cfg.num_hidden_layers)])

# %% [markdown]
# ## The forward of one FCA layer
#
# Layer 0 as `reference.bert_forward` runs it (tutorial 3 did the same on the real model): attention,
# Add & LayerNorm, then FCA on its output `x` (n units), then the FFN on the shorter sequence.
#
# 1. `reference.attention(..., want_stats=True)` returns the probabilities `P` `[B, h, n, n]` and
#    `reference.attention_stats` of their head average `Ā = mean_h P_h`;
# 2. the score (`fca.SCORES["attention_received"]`) is the attention a unit receives from the other
#    valid units: `s_j = Σ_i Ā_ij − Ā_jj`;
# 3. `fca.select` keeps `[CLS]` and the `k − 1` best-scoring others (the fine units, `F`);
# 4. the rest, `U`, become one coarse unit `c = Σ_{j∈U} w_j x_j` with `w = softmax(s_U)`
#    (`fca.AGGREGATES["weighted"]`); `fca.merge` writes the new sequence `y = [x_F ; c]` as the
#    product of `x` with a matrix whose coarse rows are `W` `[c, m]`.
#
# `fca.reduce_sequence` does steps 2-4 for one sequence.

# %%
p0, eps = params["layers"][0], cfg.layer_norm_eps
emb = reference.embeddings(ids, tt, **params["embeddings"], eps=eps)                     # [B, L, H]
a, probs, stats, keys = reference.attention(emb, mask, None, **p0["attn"], n_head=cfg.num_attention_heads,
                                            want_stats=True)  # log sizes: all 0 at layer 0
x = reference.add_layer_norm(a, emb, **p0["attn_ln"], eps=eps)                           # [B, n, H]: FCA's input
b = 0                                                                                    # sequence 0, 10 tokens
scores = fca.SCORES[schedule.score]({k: v[b] for k, v in stats.items()}, x[b], keys[b], None)  # [n]
fine, rest, groups, w = fca.reduce_sequence(schedule, 0, x[b], np.ones(L, np.float32),
                                            {k: v[b] for k, v in stats.items()}, keys[b], None, L)
y, sizes, W = fca.merge(x[b], np.ones(L, np.float32), fine, rest, groups, w)
print("scores s:", scores)
print("fine units F:", fine, " U:", rest)
print("softmax weights w of U:", w, " sum", w.sum())
print(f"y: {x.shape[1]} units -> {y.shape[0]} ({len(fine)} fine + 1 coarse); sizes {sizes}")
print("coarse unit == sum_j w_j x_j:", np.allclose(y[-1], w @ x[b, rest], rtol=1e-14, atol=0))

# %% [markdown]
# In training the same step runs through `grad.fca_forward`, which calls `fca.reduce_sequence` and
# `fca.merge` for each sequence of the batch (the same units, in the same order) and keeps what the
# backward needs: each sequence's valid positions, `F`, `U`, the groups, `w` and `W`. (The shortest
# sequence keeps all its units: with `k = ceil(0.6 × 4) = 3` fine units only one unit would be left, a
# coarse unit of one, and `reduce_sequence` leaves such a layer alone.)

# %%
state0 = fca.FCAState.start(mask, fca.sequence_seeds(ids, mask), trace=False)
y_b, mask_b, sizes_b, cache_fca = grad.fca_forward(schedule, 0, x, mask, np.asarray(mask, np.float32), stats, keys,
                                                   state0.seeds, state0.n_tokens)
row = cache_fca["rows"][0]
print("units per sequence:", mask.sum(1).astype(int), "->", mask_b.sum(1).astype(int))
print("the same selection and weights as above:", np.array_equal(row["fine"], fine), np.array_equal(row["rest"], rest),
      np.allclose(row["w"], w, rtol=1e-14, atol=0))
print("the same units:", np.allclose(y_b[0, :len(y)], y, rtol=1e-14, atol=0))

# %% [markdown]
# ## Its backward, derived
#
# Let `G = ∂L/∂y` be the gradient the FFN's backward hands back for the shortened sequence (one row
# per fine unit, one for the coarse unit, `g_c = ∂L/∂c`). Four steps carry it back to `x`, to the
# scores `s` and to the attention probabilities `P`:
#
# - **Fine units are a gather.** `y_r = x_{F_r}` copies a row, so its gradient goes back to the row
#   it copied: `∂L/∂x_{F_r} = G_r` (a scatter; every other row of `x` gets nothing from here).
# - **The coarse unit is a weighted sum.** `c = Σ_j w_j x_j`, so each member gets its share
#   `∂L/∂x_j = w_j g_c` (`W.T @ g_c`) and each weight gets `∂L/∂w_j = g_c · x_j`.
# - **The weights are a softmax of the scores.** For `w = softmax(s_U)`, `∂L/∂s_j = w_j (∂L/∂w_j − Σ_k w_k ∂L/∂w_k)`
#   (`grad.softmax_backward`'s formula, applied within each coarse unit's group). `grad.fca_backward`
#   returns `∂L/∂x` and `∂L/∂s`; for `mean` or `drop` (weights from sizes only) `∂L/∂s = 0`.
# - **The scores are sums of head-averaged attention.** `s_j = (Σ_i valid_i Ā_ij − Ā_jj) valid_j`
#   is linear in `Ā`, so `∂L/∂Ā_ij = valid_i valid_j ∂L/∂s_j − δ_ij ∂L/∂s_j` (`grad.received_backward`)
#   and, as `Ā = mean_h P_h`, each head gets `∂L/∂P_h = ∂L/∂Ā / h`. That gradient joins the one from the
#   attention's own output inside `grad.attention_backward(..., d_probs=...)`, and both go through the
#   attention softmax (`grad.softmax_backward` again) to the logits `QKᵀ/√d`, to Q and K, and to the
#   layer's input.
#
# **The selection gets no gradient.** Which units are in `F` is decided by a comparison of scores (a
# sort): the chosen set is constant in a neighbourhood of the current parameters and jumps where two
# scores cross. Its derivative is zero wherever it exists, so the backward treats `F` and `U` as
# constants and differentiates the function of the parameters *at this selection*. Sizes, and the log
# sizes of proportional attention, are counts: constants too.
#
# Here is `grad.fca_backward` on a random `G`, with each piece checked against the formula written out:

# %%
G = np.random.default_rng(1).standard_normal(y_b.shape) * mask_b[:, :, None]          # [B, n', H]
dx, ds = grad.fca_backward(G, cache_fca, schedule.aggregate)                          # [B, n, H], [B, n]
k = len(fine)
g_c = G[0, k]                                                                         # the coarse unit's gradient
print("fine rows: dx[F] == G[:k]:", np.array_equal(dx[0, fine], G[0, :k]))
print("members: dx[U] == w_j g_c:", np.allclose(dx[0, rest], w[:, None] * g_c, rtol=1e-14, atol=0))
dw = x[0, rest] @ g_c                                                                 # dL/dw_j = g_c . x_j
print("scores: ds[U] == w (dw - w.dw):", np.allclose(ds[0, rest], grad.softmax_backward(dw, w), rtol=1e-12, atol=0))
print("fine units' scores get no gradient:", np.all(ds[0, fine] == 0))
valid = mask.astype(np.float64)
d_abar, _ = grad.received_backward(ds, probs.mean(1), valid, x)                       # [B, n, n]
print("dL/dAbar, sequence 1 (7 valid units and 3 of padding: their rows and columns stay 0):")
print(d_abar[1] + 0.0)                                                                # + 0.0: no "-0."

# %% [markdown]
# In that matrix column `j` holds `∂L/∂s_j` in every valid row but its own (the diagonal, `Ā_jj`, is
# subtracted from the score); only the members of `U` have a nonzero column, and theirs add up to zero,
# as a softmax's gradient does within its group (moving every score of `U` by the same amount leaves
# `w` unchanged).
#
# The score's gradient is easy to check on its own: move one score by `±h`, recompute the weights
# with the aggregate and the coarse unit with `fca.merge`, and take the central difference of
# `Σ G ⊙ y` (only its coarse row moves). The selection is held fixed, as the backward assumes.

# %%
def coarse_objective(s):
    """Σ G ⊙ y as a function of the scores; only the coarse row (y[k]) depends on them."""
    ww = fca.AGGREGATES["weighted"](s[rest], np.ones(len(rest)), keys[0, rest], 1)[1]
    return float(G[0, k] @ fca.merge(x[0], np.ones(L), fine, rest, groups, ww)[0][k])


h = 1e-5
for j in rest:
    e = np.zeros(L)
    e[j] = h
    fd = (coarse_objective(scores + e) - coarse_objective(scores - e)) / (2 * h)
    print(f"unit {j}: dL/ds finite difference {fd: .10f}, fca_backward {ds[0, j]: .10f}, "
          f"relative error {abs(fd - ds[0, j]) / abs(ds[0, j]):.1e}")

# %% [markdown]
# The differences agree to rounding and truncation (relative errors are largest for the smallest
# gradients, whose absolute error is as small as the others').
#
# ## One layer, the whole model
#
# `grad.layer_backward` chains one layer's pieces in reverse: the FFN's Add & LayerNorm
# (`grad.add_layer_norm_backward`), `grad.ffn_backward` plus the residual, then `grad.fca_backward`
# (back from `n'` to `n` units), the score's backward (`grad.SCORE_BACKWARDS`, here
# `received_backward`), the attention's Add & LayerNorm and `grad.attention_backward` with the extra
# `d_probs`. `grad.forward` is `reference.bert_forward` itself, handed a `grad.Tape` as its ops (so
# the training forward is the reference's loop, not a copy): each op records what the backward reads.
# `grad.backward` walks the records from the last layer to the first and ends with the embeddings,
# returning every parameter's gradient in the parameters' own layout and `∂L/∂x₀`, the gradient of the
# input embeddings `x₀ = word[ids] + position + token_type` (before the embeddings' LayerNorm).
#
# The loss here reads every unit, so every path carries gradient: cross-entropy of the logits (which
# read `[CLS]` only) plus a fixed random linear function of the mean-pooled embedding (which averages all
# units, by size).

# %%
proj = np.random.default_rng(2).standard_normal((B, cfg.hidden_size))


def loss_of(p, config=schedule):
    out, cache = grad.forward(p, cfg, ids, mask, tt, fca=config)
    ce, d_logits = grad.cross_entropy(out["logits"], labels)
    return ce + float((out["embeddings"] * proj).sum()), out, cache, d_logits


def selection(cache):
    """Which units were fine at each FCA layer, per sequence: the discrete part of the forward."""
    return tuple(tuple(tuple(int(u) for u in r["fine"]) for r in rec["fca"]["rows"])
                 for rec in cache["layers"] if rec["fca"])


value, out, cache, d_logits = loss_of(params)
grads, d_inputs = grad.backward(params, cfg, cache, {"logits": d_logits, "embeddings": proj})
print(f"loss {value:.6f}; units per sequence at the end: {out['mask'].sum(1).astype(int)}, sizes {out['sizes'][0]}")
cast32 = lambda t: ({k: cast32(v) for k, v in t.items()} if isinstance(t, dict)
                    else [cast32(v) for v in t] if isinstance(t, list) else t.astype(np.float32))
p32 = cast32(params)                                                  # the same model in float32, for comparisons
print("in float32, bit for bit the units of reference.bert_forward:",
      np.array_equal(grad.forward(p32, cfg, ids, mask, tt, fca=schedule)[0]["last_hidden_state"],
                     reference.bert_forward(p32, cfg, ids, mask, tt, fca=schedule)["last_hidden_state"]))
diff64 = np.abs(out["last_hidden_state"] - reference.bert_forward(params, cfg, ids, mask, tt,
                                                                  fca=schedule)["last_hidden_state"]).max()
print(f"in float64 they differ by {diff64:.1e} (float64 rounding; its eps is 2.2e-16)")
print("fine units per layer, sequence 0:", [s[0] for s in selection(cache)])
print("gradient tensors:", len(grad.leaves(grads)), "| d_inputs", d_inputs.shape)

# %% [markdown]
# ## Finite differences
#
# The central difference `(L(θ + h e) − L(θ − h e)) / 2h` differs from the derivative by
# `h² L'''/6` (truncation) plus the rounding of the two losses divided by `2h`, about `ε |L| / h`
# with `ε ≈ 1.1e-16` in float64. With `h = 1e-5` both are around 1e-10 to 1e-11, far below any
# error a wrong term in the backward would make. We check the entry with the largest gradient in a few
# tensors: one before FCA in layer 0 (the query weights: their gradient includes the path through the
# scores and the softmax weights), the LayerNorm whose output FCA reduces, the FFN of layer 1 (which runs
# on coarse units), the classifier, and one entry of the input embeddings. The input embedding
# `x₀[b, l]` is perturbed through the word-embedding row of a token that occurs once in the batch:
# that row enters `x₀` only at `[b, l]`, so its gradient is `∂L/∂x₀[b, l]` (the scatter of the
# embedding lookup, in reverse).
#
# `no score path` is the same backward with the gradient through the scores switched off (the
# weights `w` treated as constants, as for a `mean` aggregate): it shows that this path matters.

# %%
def entry(tree, path):
    node = tree
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else node[part]
    return node


def central_difference(p, array, i, h, config=schedule):
    old = array[i]
    array[i] = old + h
    up, _, c_up, _ = loss_of(p, config)
    array[i] = old - h
    down, _, c_down, _ = loss_of(p, config)
    array[i] = old
    return (up - down) / (2 * h), selection(c_up) == selection(c_down) == selection(cache)


cut_cache = dict(cache, fca=dataclasses.replace(schedule, aggregate="mean"))        # w held constant in backward
cut = dict(grad.leaves(grad.backward(params, cfg, cut_cache, {"logits": d_logits, "embeddings": proj})[0]))
flat = dict(grad.leaves(grads))
counts = {t: int((ids == t).sum()) for t in np.unique(ids[mask > 0])}
bl = next((b_, l_) for b_, l_ in zip(*np.nonzero(mask)) if counts[ids[b_, l_]] == 1 and l_ > 0)
token = int(ids[bl])
checks = [(path, np.unravel_index(np.argmax(np.abs(flat[path])), flat[path].shape))
          for path in ("layers.0.attn.q.w", "layers.0.attn.k.w", "layers.0.attn_ln.g", "layers.1.ffn.i.w",
                       "classifier.w")]
checks.append(("embeddings.word", (token, int(np.argmax(np.abs(d_inputs[bl]))))))
h = 1e-5
print(f"{'tensor':22s} {'entry':>9s} {'backward':>14s} {'finite diff.':>14s} {'rel. error':>10s} {'no score path':>13s}")
for path, i in checks:
    fd, same = central_difference(params, entry(params, path), i, h)
    g = d_inputs[bl][i[1]] if path == "embeddings.word" else flat[path][i]
    label = f"x0[{bl[0]},{bl[1]}] (id {token})" if path == "embeddings.word" else path
    print(f"{label:22s} {tuple(int(v) for v in i)!s:>9s} {g:14.9f} {fd:14.9f} {abs(fd - g) / abs(g):10.1e} "
          f"{abs(fd - cut[path][i]) / abs(g):13.1e}" + ("" if same else "  (selection changed!)"))
print("the word row's gradient is d_inputs at its one position:", np.allclose(flat["embeddings.word"][token], d_inputs[bl]))

# %% [markdown]
# The relative errors are 1e-10 or below: the size the truncation and rounding terms predict,
# for every tensor, on both sides of the two FCA layers. Without the score path the gradients in
# front of the first reduction are off by orders of magnitude more than that (the query and key
# weights shape the attention that scores the units, and so the coarse unit's weights); those after
# the last one (the classifier's, layer 1's FFN) do not change. (`tests/test_backward.py` runs the same check on every tensor, and the whole
# backward against torch autograd on several shapes, rules and with dropout.)
#
# ## The step size, and the selection
#
# Why `h = 1e-5`? Too large and truncation grows as `h²`; too small and rounding grows as `1/h`. In
# float32 (`ε ≈ 6e-8`) the same balance sits near `h ≈ 1e-3`, and the best error there is thousands of
# times float64's: gradient checks are run in float64. But a large step here has a second, worse
# problem: it can change the selection. The sweep below perturbs one entry of layer 0's query weights
# by `±h` for a range of `h`, in float64 and in float32, against the float64 backward, and marks the
# steps at which either perturbed forward selected different fine units.

# %%
path, i = checks[0]
g = flat[path][i]
steps = 10.0 ** -np.arange(0, 10)
sweep = []
for step in steps:
    fd64, same64 = central_difference(params, entry(params, path), i, step)
    fd32, same32 = central_difference(p32, entry(p32, path), i, np.float32(step))
    sweep.append((step, abs(fd64 - g) / abs(g), abs(fd32 - g) / abs(g), same64, same32))
print(f"{path}{tuple(int(v) for v in i)}: backward {g:.9f}")
print(f"{'h':>7s} {'rel. error float64':>18s} {'float32':>10s}  selection")
for step, e64, e32, s64, s32 in sweep:
    print(f"{step:7.0e} {e64:18.1e} {e32:10.1e}  {'same' if s64 and s32 else 'CHANGED'}")
fig, ax = plt.subplots(figsize=(6.4, 3.6))
for col, name in ((1, "float64"), (2, "float32")):
    ax.loglog([s[0] for s in sweep], [max(s[col], 1e-16) for s in sweep], "o-", label=name, ms=4)
flipped = [s[0] for s in sweep if not (s[3] and s[4])]
for s_ in flipped:
    ax.axvline(s_, color="red", alpha=0.25, lw=6)
ax.set_xlabel("step h")
ax.set_ylabel("relative error of the central difference")
ax.set_title("finite differences against grad.backward (red: the selection changed)", fontsize=10)
ax.invert_xaxis()
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# In float64 the error falls as `h²` down to about `h = 1e-5` and then grows again as rounding
# takes over; in float32 the best step is much larger and the best error much worse. At the largest steps
# the error is large in both, and the sweep says why: the perturbed forward chose different fine units.
#
# ## What a change of the selection does
#
# Walk along the same entry, `θ + t e`, for `t` in `[-0.5, 0.5]`, and watch the loss and the
# selection. Between changes of the selection the loss is smooth, and `grad.backward`'s derivative is
# its slope. Where two units' scores cross, one unit leaves the fine units and the other takes its
# place: the sequence the next layers read is a different one, and the loss **jumps**. The gradient
# knows nothing of the jump (it cannot: the selection has no derivative), so a finite difference
# whose two points straddle a change measures `jump / 2h` instead of the slope. A gradient check is
# only valid with a step smaller than the distance to the nearest change, which is why the code
# above reports whether each perturbed forward kept the selection.

# %%
A, old = entry(params, path), entry(params, path)[i]


def along(t):
    """(loss, selection, cache, d_logits) at θ + t e."""
    A[i] = old + t
    value_t, _, cache_t, d_logits_t = loss_of(params)
    A[i] = old
    return value_t, selection(cache_t), cache_t, d_logits_t


ts = np.linspace(-0.5, 0.5, 201)
walk = [along(t)[:2] for t in ts]
changes = []
for j in range(len(ts) - 1):
    if walk[j][1] == walk[j + 1][1]:
        continue
    lo, hi = ts[j], ts[j + 1]
    for _ in range(40):                                              # bisect to where the selection changes
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if along(mid)[1] == walk[j][1] else (lo, mid)
    left, right = along(lo), along(hi)                               # within 1e-14 of each other
    swaps = [(layer, seq, sorted(set(f0) - set(f1)), sorted(set(f1) - set(f0)))
             for layer, (s0, s1) in enumerate(zip(left[1], right[1])) for seq, (f0, f1) in enumerate(zip(s0, s1))
             if f0 != f1]
    changes.append({"t": (lo + hi) / 2, "jump": right[0] - left[0], "swaps": swaps})
print(f"t in [-0.5, 0.5]: the selection changes {len(changes)} times")
print(f"{'t*':>10s} {'loss jump':>10s}  what changes (layer, sequence: units leaving the fine units -> joining them)")
for c in changes:
    what = "; ".join(f"layer {l}, seq {q}: {out_} -> {in_}" for l, q, out_, in_ in c["swaps"])
    print(f"{c['t']:10.6f} {c['jump']:+10.6f}  {what}")

fig, ax = plt.subplots(figsize=(6.4, 3.8))
ax.plot(ts, [v for v, _ in walk], lw=1.5, label="loss L(θ + t e)")
ax.plot(ts, value + g * ts, "--", lw=1, label="tangent at t = 0 (grad.backward)")
for c in changes:
    ax.axvline(c["t"], color="red", alpha=0.3, lw=1)
ax.set_xlabel(f"t (added to {path}{tuple(int(v) for v in i)})")
ax.set_ylabel("loss")
ax.set_title("the loss along one weight; red: the selection of fine units changes", fontsize=10)
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# Now stand just beside the change with the largest jump, `δ = 1e-4` on the side of `t = 0`, and
# take central differences with shrinking steps. `grad.backward` at that point gives the slope of
# the smooth piece we stand on. Steps larger than `δ` reach across the change and measure mostly
# the jump (`fd − backward ≈ jump / 2h`);
# steps smaller than `δ` agree with the backward again.

# %%
big = max(changes, key=lambda c: abs(c["jump"]))
delta = 1e-4
t0 = big["t"] - np.sign(big["t"]) * delta                            # toward t = 0
value0, sel0, cache0, d_logits0 = along(t0)
g0 = dict(grad.leaves(grad.backward(params, cfg, cache0, {"logits": d_logits0, "embeddings": proj})[0]))[path][i]
print(f"at t = {t0:.6f} ({delta:.0e} from the change at t* = {big['t']:.6f}, jump {big['jump']:+.6f}): "
      f"backward {g0:.9f}")
print(f"{'h':>7s} {'finite diff.':>14s} {'rel. error':>10s} {'fd - backward':>14s} {'jump / 2h':>10s}  the two points")
for step in (1e-2, 1e-3, 3e-4, 3e-5, 1e-5, 1e-6):
    up, down = along(t0 + step), along(t0 - step)
    fd = (up[0] - down[0]) / (2 * step)
    same = up[1] == down[1] == sel0
    jump = f"{big['jump'] / (2 * step):10.3f}" if not same else f"{'':10s}"
    print(f"{step:7.0e} {fd:14.6f} {abs(fd - g0) / abs(g0):10.1e} {fd - g0:14.3f} {jump}  "
          f"{'same selection' if same else 'straddle the change'}")

# %% [markdown]
# That is what "the selection gets no gradient" means in practice: the backward is exact for the
# network with its current selection, and training follows it; when a step of the optimizer moves
# two scores across each other, the network changes to a neighbouring one, as a ReLU switching off
# changes the active linear piece (but with a jump, since a unit moves from a fine unit to inside
# the coarse one). Training does not try to move the selection; it teaches the layers after each
# reduction to read whatever the selection hands them, which is the point of re-training with FCA.
#
# ## Distillation: the shared SST-2 fine-tune with a 50% schedule
#
# `distill.distill` (the library function behind `minifca distill`) trains the checkpoint with FCA on
# against the same checkpoint without it: for each batch of training sentences, the teacher's logits
# (a plain forward, no FCA), then `grad.forward` with FCA and dropout, the loss
# `cross-entropy(labels) + T² KL(teacher ‖ student)` (`grad.cross_entropy`, `grad.kl_to_teacher`),
# `grad.backward`, gradient clipping and an AdamW step with linear warm-up and decay. It writes a
# Hugging Face folder (and `fca.json`, the schedule) and returns the loss of every step.
#
# The schedule is `docs/schedules/sst2_050_hard.json`, the one `docs/results.md` §1 calibrated on
# training data at half the FLOPs: `[CLS]` and one coarse unit are all that is left after layer 3's
# attention. We train on the start of SST-2 train, for a few tens of small steps only: this shows the
# mechanics, it is not the real run. The real runs (`minifca distill` on the whole training set)
# and their dev accuracy are in [docs/results.md §4](../docs/results.md). The settings are distill's
# defaults (AdamW at 5e-5, 6% warm-up then linear decay, dropout 0.1, clipping at 1), in small batches.

# %%
steps, batch_size = (4, 8) if FAST else (80, 16)
train_file = shared_path("sst2_train")
rows = train_file.read_text(encoding="utf-8").splitlines()
work = Path(tempfile.mkdtemp(prefix="minifca-tutorial-06-"))
(work / "train.tsv").write_text("\n".join(rows[:1 + steps * batch_size]) + "\n", encoding="utf-8")  # header + rows
schedule_050 = fca.FCAConfig.load(ROOT / "docs/schedules/sst2_050_hard.json")
print(schedule_050.describe())
print(f"training on the first {steps * batch_size} sentences of {train_file.name} "
      f"({steps * batch_size / (len(rows) - 1):.2%} of an epoch): {steps} steps of {batch_size}")
t = time.perf_counter()
run = distill.distill(SST2_MODEL, work / "train.tsv", work / "distilled", fca=schedule_050, steps=steps,
                      batch_size=batch_size, lr=5e-5, dropout=0.1, seed=0, progress_bar=False, log=lambda *_: None)
print(f"{run['steps']} steps, {run['examples']} sentences in {time.perf_counter() - t:.0f} s "
      f"({run['examples_per_s']:.1f} sentences/s)")
print("written:", sorted(f.name for f in (work / "distilled").iterdir()))

# %%
loss = np.array([h["loss"] for h in run["history"]])
fig, ax = plt.subplots(figsize=(6.4, 3.4))
ax.plot(np.arange(1, len(loss) + 1), loss, "o-", ms=3, lw=1, label="training loss per step (one batch)")
window = max(1, len(loss) // 10)
smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
ax.plot(np.arange(window, len(loss) + 1), smooth, lw=2.5, label=f"mean of the last {window} steps")
ax.set_xlabel("step")
ax.set_ylabel("cross-entropy + KL to the teacher")
ax.set_title(f"distill.distill with sst2_050_hard, batches of {batch_size}", fontsize=10)
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
half = len(loss) // 2
print(f"mean loss over steps 1-{half}: {loss[:half].mean():.4f}; steps {half + 1}-{len(loss)}: {loss[half:].mean():.4f}")

# %% [markdown]
# Each point is one batch of different sentences, so the curve is noisy; what matters is what the
# model now does on sentences it did not train on. Two samples, for the model before and after
# training, with the schedule:
#
# - **held-out SST-2 train**: the last 512 rows of `train.tsv`, which the run above never saw (it
#   trained on the first rows). The same distribution as the training data, but the fine-tune has
#   fitted its training set, so FCA already agrees with the full model on most of it (`docs/results.md` §1);
# - the SST-2 **dev** set, only as an illustration: nothing here is chosen by it.
#
# In each: agreement with the teacher's predictions (the full model without FCA), and the two terms
# of the training loss, cross-entropy to the labels and KL to the teacher (fast mode: 24 sentences each).

# %%
teacher = minifca.from_pretrained(SST2_MODEL, backend="numpy")
student = minifca.from_pretrained(work / "distilled", backend="numpy")
n_eval = 24 if FAST else None
(work / "heldout.tsv").write_text("\n".join(rows[:1] + rows[-(n_eval or 512):]) + "\n", encoding="utf-8")
samples = {"held-out SST-2 train": read_sst2(work / "heldout.tsv"), "SST-2 dev": read_sst2(SST2_DEV, limit=n_eval)}


def logits_of(model, config, enc):
    outs = [model(enc[i:i + 64], fca=config) for i in range(0, len(enc.input_ids), 64)]
    flops = sum(o.flops for o in outs) / sum(o.flops_full for o in outs)
    return np.concatenate([o.logits for o in outs]).astype(np.float64), flops


results = {}
for sample, (texts, gold) in samples.items():
    enc = teacher.tokenize(texts)
    full_logits, _ = logits_of(teacher, None, enc)
    results[sample] = {"full model (the teacher)": (full_logits, 1.0),
                       "before: the fine-tune with FCA": logits_of(teacher, schedule_050, enc),
                       f"after {run['steps']} steps, with FCA": logits_of(student, schedule_050, enc),
                       f"after {run['steps']} steps, without FCA": logits_of(student, None, enc)}
    print(f"{sample}: {len(texts)} sentences")
    print(f"  {'':34s} {'FLOPs':>6s} {'agreement':>10s} {'cross-entropy':>14s} {'KL to teacher':>14s} {'accuracy':>9s}")
    for name, (lg, flops) in results[sample].items():
        agree = np.mean(lg.argmax(1) == full_logits.argmax(1))
        ce = grad.cross_entropy(lg, gold)[0]
        kl = grad.kl_to_teacher(lg, full_logits)[0]
        print(f"  {name:34s} {flops:6.1%} {agree:10.1%} {ce:14.4f} {kl:14.4f} {np.mean(lg.argmax(1) == gold):9.3f}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(8, 3.8), sharey=True)
dev = results["SST-2 dev"]
p_full = reference.softmax(dev["full model (the teacher)"][0])[:, 1]
for ax, name in zip(axes, list(dev)[1:3]):
    p = reference.softmax(dev[name][0])[:, 1]
    differ = (p > 0.5) != (p_full > 0.5)
    ax.scatter(p_full[~differ], p[~differ], s=8, alpha=0.6, label="same label as the teacher")
    ax.scatter(p_full[differ], p[differ], s=14, color="red", label=f"a different label ({int(differ.sum())})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
    ax.set_title(f"{name} (SST-2 dev)", fontsize=10)
    ax.set_xlabel("P(positive), full model")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
axes[0].set_ylabel("P(positive), with FCA")
fig.tight_layout()

# %% [markdown]
# A few tens of steps on a thousand-odd sentences (the share of an epoch is printed above) show the
# mechanics, not the result:
# the numbers above move with the seed, the sample and the learning rate, and one sentence is
# `1 / len(texts)` of the agreement. The real runs, with the full training set, the command lines and
# their dev results, are in [docs/results.md §4](../docs/results.md). From the command line, the same
# training on the whole file (one epoch in batches of 32, distill's default) and its evaluation on dev:
#
# ```
# minifca distill --model ../shared/models/minilm-l6-sst2 --data ../shared/data/sst2/train.tsv \
#     --out weights/sst2_050_hard_distilled --fca-schedule docs/schedules/sst2_050_hard.json
# minifca eval --model weights/sst2_050_hard_distilled --data ../shared/data/sst2/dev.tsv \
#     --fca-schedule docs/schedules/sst2_050_hard.json
# ```

# %%
shutil.rmtree(work)                                                  # the trained checkpoint was only for this page
print("removed", work.name)
