# %% [markdown]
# # 4. Counting the savings
#
# FCA's claim is fewer FLOPs for nearly the same accuracy. This tutorial does the arithmetic with
# [`minifca/flops.py`](../minifca/flops.py), then checks it against the clock.
#
# | step | function |
# |---|---|
# | one layer, term by term | `flops.layer_flops` (mirrors `reference.attention`, `reference.add_layer_norm`, `reference.ffn`) |
# | the whole model | `flops.flops_per_layer`, `flops.model_flops`, `flops.head_flops` |
# | what FCA saves | `Output.flops`, `Output.flops_full`, `Output.flops_full_padded` (from `fca.FCAState.units`) |
# | the clock | `Model.forward` on the `numpy` backend (`reference.bert_forward`) |
#
# FLOPs are 2 × multiply-adds, counted over valid units only.

# %%
import os
import time

import matplotlib.pyplot as plt
import numba
import numpy as np

import minifca
from minifca import flops
from _setup import FAST, SST2_MODEL, read_sst2

model = minifca.from_pretrained(SST2_MODEL, backend="numpy")   # the reference (default: "numba")
cfg = model.config
H, I, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
print(f"H = {H}, I = {I}, heads = {h}, layers = {cfg.num_hidden_layers}")

# %% [markdown]
# ## One layer
#
# A layer with `n` units entering and leaving it (no FCA) costs
#
# | part | FLOPs | where in `reference.py` |
# |---|---|---|
# | Q, K, V and output projections | `4 · 2nH²` | `attention`: four `linear` calls |
# | `QKᵀ` and `A·V` | `2 · 2n²H` | `attention`: the two matrix products |
# | two FFN linears | `2 · 2nHI` | `ffn` |
# | LayerNorm scale and shift | `2 · 2nH` | `add_layer_norm` (twice) |
#
# The only term that grows with `n²` is attention itself. Everything else is linear in `n`,
# and with `I = 4H` the FFN alone is twice the projections.

# %%
def parts(n):
    return {"projections": 8 * n * H * H, "QK^T + AV": 4 * n * n * H, "FFN": 4 * n * H * I, "LayerNorm": 4 * n * H}


lengths = [8, 16, 32, 64, 128, 256, 512]
print(f"{'n':>4} {'MFLOPs':>8} " + " ".join(f"{k:>12}" for k in parts(1)))
for n in lengths:
    p, total = parts(n), int(flops.layer_flops(n, n, H, I, h))
    assert sum(p.values()) == total                  # the table is the function, term by term
    print(f"{n:4d} {total / 1e6:8.1f} " + " ".join(f"{v / total:12.2%}" for v in p.values()))

# %% [markdown]
# Attention's `n²` term (`4n²H`) overtakes the FFN (`4nHI`) only at `n = I`, and the projections and
# the FFN together (`8nH² + 4nHI`) only at `n = 2H + I`, far beyond SST-2's sentences (and, for this model, beyond its 512 positions).
# That is why token reduction pays off even for short inputs: removing a unit removes its share of
# the FFN and the projections, the bulk of the cost, not only its row and column of attention.

# %%
print("attention = FFN at n =", I, "| attention = projections + FFN at n =", 2 * H + I)
texts, labels = read_sst2(limit=48 if FAST else 872)
n_dev = model.tokenize(texts).attention_mask.sum(1)
print(f"SST-2 dev ({len(texts)} sentences): length mean {n_dev.mean():.1f}, median {np.median(n_dev):.0f}, max {n_dev.max()}")

# %%
fig, ax = plt.subplots(figsize=(8, 3.4))
bottom = np.zeros(len(lengths))
for name in parts(1):
    share = np.array([parts(n)[name] / flops.layer_flops(n, n, H, I, h) for n in lengths])
    ax.bar([str(n) for n in lengths], share, bottom=bottom, label=name)
    bottom += share
ax.set_xlabel("units n entering the layer"), ax.set_ylabel("share of the layer's FLOPs")
ax.set_title(f"one layer of MiniLM (H={H}, I={I})", fontsize=10)
ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
fig.tight_layout()

# %% [markdown]
# ## The whole model, and what FCA saves
#
# `flops.model_flops` adds the embeddings (`4LH`), every layer and the heads (`head_flops`: pooler
# `2H²`, classifier `2HC`). With FCA the per-layer unit counts come from the forward itself
# (`Output.units`, kept by `FCAState`): attention and the projections use the `n` units entering
# the layer, the FFN the `k + c` left after selection (`k` fine units and here `c = 1` coarse unit),
# and scoring and aggregation add a little. The table adds up to `Output.flops` (checked below).
#
# The sentence of tutorials 2 and 3, with the decaying schedule of tutorial 3:

# %%
schedule = minifca.FCAConfig(keep=[0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
enc = model.tokenize(["we know the plot 's a little crazy , but it held my interest from start to finish ."])
out = model(enc, fca=schedule)
n = int(enc.attention_mask.sum())
print(n, "tokens")
head = flops.head_flops(cfg)
print(f"full model: {int(flops.model_flops(cfg, [n], None, head)[0]) / 1e6:.1f} MFLOPs "
      f"(= Output.flops_full {out.flops_full / 1e6:.1f})")
per_layer = flops.flops_per_layer(cfg, [n], out.units)[:, 0]         # [layers]
full_layer = flops.flops_per_layer(cfg, [n])[:, 0]                    # [layers]
print(f"{'layer':>5} {'n in':>5} {'n out':>5} {'merged':>6} {'MFLOPs':>7} {'of full':>8}")
for layer, u in enumerate(out.units):
    print(f"{layer:5d} {u['n_in'][0]:5d} {u['n_out'][0]:5d} {u['n_merged'][0]:6d} {per_layer[layer] / 1e6:7.1f} "
          f"{per_layer[layer] / full_layer[layer]:8.1%}")
assert out.flops == 4 * n * H + per_layer.sum() + head   # embeddings + layers + heads
print(f"with FCA: {out.flops / 1e6:.1f} MFLOPs = {out.flops / out.flops_full:.1%} of the full model")

# %% [markdown]
# ### Padded or unpadded?
#
# The paper reports FLOPs at SST-2's fixed padded length of 64: the full model is charged for 64
# positions even when the sentence has 10 tokens. That baseline is much larger than the work a
# length-aware implementation does, so the same FCA run looks far cheaper against it.
# `Output.flops_full` is the honest, unpadded baseline; `Output.flops_full_padded` (with `pad_to=64`)
# the paper's. Over the dev sample:

# %%
fca_flops = full = padded = 0
for i in range(0, len(texts), 64):
    o = model(model.tokenize(texts[i:i + 64]), fca=schedule, pad_to=64)
    fca_flops, full, padded = fca_flops + o.flops, full + o.flops_full, padded + o.flops_full_padded
print(f"FCA: {fca_flops / len(texts) / 1e6:.1f} MFLOPs per sentence")
print(f"  vs unpadded full model ({full / len(texts) / 1e6:.1f} M): {fca_flops / full:.1%}")
print(f"  vs full model padded to 64 ({padded / len(texts) / 1e6:.1f} M): {fca_flops / padded:.1%}")

# %% [markdown]
# ## The clock
#
# FLOPs are a model of cost, not the cost. Small matrices run far below the machine's peak, and FCA
# adds per-sequence Python work (selection, merging) that FLOPs do not count. The count is the same
# for every backend; the time is not, so we time the NumPy reference (`reference.bert_forward`) and
# the default Numba backend (`minifca/kernels/cpu.py`) side by side. And this machine is shared: the
# load average printed below says how busy it was while the tutorial ran, so read the times as "on
# this machine, at that moment". Time one sentence (batch 1) at several lengths, the fastest of a few
# repeats (the one least disturbed by other work):

# %%
repeats = 1 if FAST else 5
backends = {"numpy": model, "numba": minifca.from_pretrained(SST2_MODEL, backend="numba")}
print(f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}, "
      f"BLAS threads {os.environ.get('OPENBLAS_NUM_THREADS', 'default')}, "
      f"Numba threads {numba.get_num_threads()} (build.py sets 1 and 1)")


def clock(fn):
    fn()                                                            # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


rng = np.random.default_rng(0)
rows = []                                                           # (n, FLOPs, {backend: seconds})
print(f"{'n':>4} {'MFLOPs':>8} " + " ".join(f"{b + ' ms':>10} {'GFLOP/s':>8}" for b in backends))
for n in [16, 32, 64, 128] if not FAST else [16, 32]:
    ids = np.concatenate([[101], rng.integers(1000, 30000, n - 2), [102]])[None]  # [CLS] ... [SEP]
    f = model.forward(ids).flops
    assert all(m.forward(ids).flops == f for m in backends.values())  # one count, whatever runs it
    secs = {b: clock(lambda: m.forward(ids)) for b, m in backends.items()}
    rows.append((n, f, secs))
    print(f"{n:4d} {f / 1e6:8.1f} " + " ".join(f"{s * 1e3:10.2f} {f / s / 1e9:8.2f}" for s in secs.values()))

# %% [markdown]
# And FCA against the full model on a batch of dev sentences, time ratio against FLOPs ratio:

# %%
batch = model.tokenize(texts[:8 if FAST else 32])
o = model(batch, fca=schedule)
print(f"{len(batch)} sentences, FLOPs ratio {o.flops / o.flops_full:.1%} (unpadded)")
for b, m in backends.items():
    t_full = clock(lambda: m(batch))
    t_fca = clock(lambda: m(batch, fca=schedule))
    print(f"{b:>6}: full {t_full * 1e3:7.1f} ms, FCA {t_fca * 1e3:7.1f} ms, time ratio {t_fca / t_full:.1%}")

# %%
fig, ax = plt.subplots(figsize=(5.5, 3.4))
for b in backends:
    ax.plot([f / 1e6 for _, f, _ in rows], [secs[b] * 1e3 for _, _, secs in rows], "o-", label=b)
for n, f, secs in rows:
    ax.annotate(f"n={n}", (f / 1e6, secs["numpy"] * 1e3), textcoords="offset points", xytext=(5, -10), fontsize=8)
ax.set_xlabel("MFLOPs (flops.model_flops)"), ax.set_ylabel("ms per forward")
ax.legend(fontsize=8)
ax.set_title("counted vs measured, batch 1", fontsize=10)
fig.tight_layout()
