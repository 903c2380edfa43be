# %% [markdown]
# # 1. BERT, from a checkpoint to logits
#
# This tutorial opens a fine-tuned BERT checkpoint by hand and runs one sentence through it,
# one function of [`minifca/reference.py`](../minifca/reference.py) at a time. Keep that file open beside this
# one: every step below is one of its short functions.
#
# | step | function |
# |---|---|
# | read the weights | `minifca.weights.read_safetensors`, `load_state`, `to_params` |
# | read the shape | `minifca.config.BertConfig.from_json` |
# | text to ids | `minifca.tokenizer.Tokenizer` |
# | embeddings | `reference.embeddings` (→ `reference.layer_norm`) |
# | one encoder layer | `reference.attention`, `reference.add_layer_norm`, `reference.ffn` (→ `reference.gelu`) |
# | heads | `reference.pooler`, `reference.classifier` |
# | all of it at once | `reference.bert_forward`, `minifca.from_pretrained` |
#
# The checkpoint is `all-MiniLM-L6-v2` fine-tuned on SST-2 (6 layers, hidden size 384, 12 heads),
# from the shared folder beside the repository. Each intermediate is checked against
# Hugging Face `transformers` when it is installed; when it is not, against reference figures
# that the builder stored from a run that had it (`tutorials/data/01_reference.json`).

# %%
import importlib.util
import json
import os

import numpy as np

import minifca
from minifca import reference
from minifca.config import BertConfig
from minifca.tokenizer import Tokenizer
from minifca.weights import load_state, read_safetensors, to_params
from _setup import HERE, OUT, SST2_MODEL

np.set_printoptions(precision=4, suppress=True, linewidth=110)
HAVE_TRANSFORMERS = (importlib.util.find_spec("transformers") is not None
                     and os.environ.get("MINIFCA_TUTORIAL_NO_TRANSFORMERS", "0") == "0")
print("checkpoint:", SST2_MODEL.name, "| files:", sorted(p.name for p in SST2_MODEL.iterdir()))
print("compare against:", "transformers" if HAVE_TRANSFORMERS else "tutorials/data/01_reference.json")

# %% [markdown]
# ## The weights: a safetensors file
#
# A `.safetensors` file is 8 bytes giving the length of a JSON header, the header
# (`{name: {dtype, shape, data_offsets}}`), then the raw tensors back to back.
# `read_safetensors` memory-maps the file and returns NumPy views into it: nothing is copied
# until it is used.

# %%
raw = read_safetensors(SST2_MODEL / "model.safetensors")
print(f"{len(raw)} tensors, {sum(a.size for a in raw.values()) / 1e6:.1f} M parameters")
for name in list(raw)[:5] + ["bert.encoder.layer.0.attention.self.query.weight", "classifier.weight"]:
    a = raw[name]
    print(f"  {name:52s} {str(a.dtype):8s} {tuple(a.shape)}  {type(a).__name__}")

# %% [markdown]
# ## The shape: config.json
#
# `BertConfig` keeps the fields inference needs and checks them (a wrong type or an unsupported
# option is an error that names the field).

# %%
cfg = BertConfig.from_json(SST2_MODEL / "config.json")
for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
          "hidden_act", "layer_norm_eps", "max_position_embeddings", "num_labels", "id2label"):
    print(f"  {f:24s} {getattr(cfg, f)}")
print("  head_dim                ", cfg.head_dim)

# %% [markdown]
# `load_state` renames the checkpoint's tensors (dropping the `bert.` prefix), checks every shape
# against the config, and `to_params` nests them the way the reference functions take them, so a
# layer is called as `attention(x, ..., **params["layers"][0]["attn"])`.

# %%
params = to_params(load_state([SST2_MODEL / "model.safetensors"], cfg), cfg)
layer0 = params["layers"][0]
print("top level:  ", list(params))
print("embeddings: ", {k: (tuple(v.shape) if hasattr(v, "shape") else list(v)) for k, v in params["embeddings"].items()})
print("one layer:  ", {k: list(v) for k, v in layer0.items()})
print("attn.q:     ", {k: tuple(v.shape) for k, v in layer0["attn"]["q"].items()}, "(Linear weights are [out, in])")

# %% [markdown]
# ## Text to ids
#
# The tokenizer (from `tokenizer.json`) splits the sentence into WordPiece tokens, adds `[CLS]` and
# `[SEP]`, and returns a padded batch: `input_ids`, `attention_mask` (1 = real token) and
# `token_type_ids` (which segment of a sentence pair; all 0 here).

# %%
sentence = "the mesmerizing performances of the leads keep the film grounded and keep the audience riveted ."
tok = Tokenizer.from_folder(SST2_MODEL, cfg.max_position_embeddings, cfg.pad_token_id)
enc = tok([sentence])
ids, mask, tt = enc.input_ids, enc.attention_mask, enc.token_type_ids
print(len(enc.tokens[0]), "tokens:", " ".join(enc.tokens[0]))
print("input_ids:", ids[0])

# %% [markdown]
# ### The yardstick
#
# With `transformers` installed we run the same checkpoint through `BertForSequenceClassification`
# (eager attention, so it returns the attention probabilities too) and keep every hidden state.
# Without it we read the figures a previous build stored: for each intermediate, its first 8 values
# (the `[CLS]` row; for attention, head 0's first query row) and the mean absolute value of the whole tensor.

# %%
REF_FILE = HERE / "data" / "01_reference.json"


def summary(a):
    """A few numbers that pin an intermediate down: the first 8 values of row 0, mean |a|."""
    a = np.asarray(a, np.float64)
    first = a.reshape(a.shape[0], -1) if a.ndim <= 2 else a[:, 0].reshape(a.shape[0], -1)
    return {"head": first[0, :8].tolist(), "mean_abs": float(np.abs(a).mean())}


if HAVE_TRANSFORMERS:
    import torch
    import transformers
    hf = transformers.BertForSequenceClassification.from_pretrained(
        SST2_MODEL, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        t_ids = torch.from_numpy(ids)
        hf_out = hf(input_ids=t_ids, attention_mask=torch.from_numpy(mask), token_type_ids=torch.from_numpy(tt),
                    output_hidden_states=True, output_attentions=True)
    expected = {"embeddings": hf_out.hidden_states[0].numpy(),
                "layer0.attention_probs": hf_out.attentions[0].numpy(),
                **{f"layer{i}": h.numpy() for i, h in enumerate(hf_out.hidden_states[1:])},
                "pooler": hf.bert.pooler(hf_out.hidden_states[-1]).detach().numpy(),
                "logits": hf_out.logits.numpy()}
    stored = {k: summary(v) for k, v in expected.items()}
    (OUT / "data").mkdir(parents=True, exist_ok=True)
    (OUT / "data" / "01_reference.json").write_text(json.dumps(
        {"sentence": sentence, "transformers": transformers.__version__, "values": stored}, indent=1) + "\n")
else:
    stored = json.loads(REF_FILE.read_text())["values"]


def check(name, ours):
    """Max-abs difference to transformers (full tensor) or to the stored figures."""
    if HAVE_TRANSFORMERS:
        diff = np.abs(ours - expected[name]).max()
        print(f"  {name:24s} max |ours - transformers| = {diff:.1e}")
    else:
        s, ref = summary(ours), stored[name]
        diff = max(np.abs(np.array(s["head"]) - ref["head"]).max(), abs(s["mean_abs"] - ref["mean_abs"]))
        print(f"  {name:24s} max |ours - stored figures| = {diff:.1e}")
    assert diff < 1e-4, f"{name} differs from the reference by {diff}"


print("reference ready for", len(stored), "intermediates")

# %% [markdown]
# ## Embeddings
#
# `reference.embeddings`: look up a word vector, a position vector and a token-type vector for each
# token, add them, and normalise (LayerNorm: zero mean, unit variance over the hidden size,
# then a learned scale and shift).

# %%
eps = cfg.layer_norm_eps
x = reference.embeddings(ids, tt, **params["embeddings"], eps=eps)   # [B, L] -> [B, L, H]
print("x:", x.shape, x.dtype, "| per-token mean ~ 0:", np.abs(x.mean(-1)).max() < 0.1)
check("embeddings", x)

# %% [markdown]
# ## One encoder layer, by hand
#
# A BERT layer is two sub-layers, each followed by a residual connection and LayerNorm:
#
# 1. `reference.attention`: project to queries, keys and values, split into 12 heads of 32,
#    `softmax(Q Kᵀ / √d + mask)` over the keys, mix the values, project back.
# 2. `reference.add_layer_norm(a, x)` = `layer_norm(a + x)`.
# 3. `reference.ffn`: a linear layer to the intermediate size 1536, GELU, and back to 384.
# 4. `reference.add_layer_norm` again.
#
# FCA (tutorial 3) steps in between 2 and 3: after attention, before the FFN.

# %%
p = params["layers"][0]
a, probs, stats, keys = reference.attention(x, mask, None, **p["attn"], n_head=cfg.num_attention_heads)
print("attention output:", a.shape, "| probabilities:", probs.shape, "(batch, head, query, key)")
print("each row of probabilities sums to 1:", np.allclose(probs.sum(-1), 1, atol=1e-5))
check("layer0.attention_probs", probs)
h = reference.add_layer_norm(a, x, **p["attn_ln"], eps=eps)          # [B, L, H]
f = reference.ffn(h, **p["ffn"], act=cfg.hidden_act)                 # [B, L, H] -> [B, L, I] -> [B, L, H]
y = reference.add_layer_norm(f, h, **p["ffn_ln"], eps=eps)           # [B, L, H]
check("layer0", y)

# %% [markdown]
# The intermediate size is where most of the arithmetic goes (tutorial 4 counts it): the FFN's
# hidden activation for this sentence is `[1, L, 1536]`, four times wider than the hidden state.

# %%
inner = reference.gelu(reference.linear(h, **p["ffn"]["i"]))          # [B, L, I]
print("FFN inner activation:", inner.shape, f"| {np.mean(inner < 0):.0%} of it negative (GELU lets a little through)")

# %% [markdown]
# ## All layers
#
# The same four lines, six times, each layer with its own parameters.

# %%
x_l = x
for i, p in enumerate(params["layers"]):
    a, _, _, _ = reference.attention(x_l, mask, None, **p["attn"], n_head=cfg.num_attention_heads)
    h = reference.add_layer_norm(a, x_l, **p["attn_ln"], eps=eps)
    x_l = reference.add_layer_norm(reference.ffn(h, **p["ffn"], act=cfg.hidden_act), h, **p["ffn_ln"], eps=eps)
    check(f"layer{i}", x_l)

# %% [markdown]
# ## Pooler and classifier
#
# `reference.pooler` takes the final `[CLS]` vector through a linear layer and `tanh`;
# `reference.classifier` maps it to one logit per label. A softmax turns logits into probabilities.

# %%
pooled = reference.pooler(x_l, **params["pooler"])                 # [B, L, H] -> [B, H]
check("pooler", pooled)
logits = reference.classifier(pooled, **params["classifier"])      # [B, H] -> [B, C]
check("logits", logits)
prob = reference.softmax(logits.astype(np.float64))[0]
print("logits:", logits[0], "| probabilities:", {cfg.id2label[i]: round(float(v), 4) for i, v in enumerate(prob)})
print("prediction:", cfg.id2label[int(prob.argmax())])

# %% [markdown]
# ## The same, in one call
#
# `reference.bert_forward` is the loop above (plus the FCA hook, off here), and
# `minifca.from_pretrained(...)` wraps loading, tokenizing, the forward and the heads. With
# `backend="numpy"` its forward *is* `reference.bert_forward`, so both give the logits we computed by
# hand, to the last bit. The default backend, `"numba"`, runs compiled kernels that mirror these
# functions (`minifca/kernels/cpu.py`); they add in a different order, so they agree to rounding only.

# %%
r = reference.bert_forward(params, cfg, ids, mask, tt)
print("bert_forward == by hand:", np.array_equal(r["last_hidden_state"], x_l))
model = minifca.from_pretrained(SST2_MODEL, backend="numpy")
out = model(model.tokenize([sentence]))
print("Model logits:", out.logits[0], "| equal:", np.array_equal(out.logits, logits))
print(model.classify([sentence, "a dull , lifeless film ."]))
fast = minifca.from_pretrained(SST2_MODEL)                          # backend="numba"
print(f"numba backend: max |logits - ours| = {np.abs(fast(model.tokenize([sentence])).logits - logits).max():.1e}")
