"""minifca.grad (the hand-written backward pass) against torch autograd, finite differences and itself.

Gradients are compared tensor by tensor as normwise relative errors ||got - want|| / ||want||
(elementwise errors are meaningless for entries near zero). The torch side runs in float64, so
its gradient is the true one to ~1e-15 and the error measured is minifca's own.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import minifca
from minifca import FCAConfig, grad, reference
from minifca.optim import AdamW
from minifca.weights import from_params

from conftest import EPS32, SST2_MODEL, assert_f32_close, torch_reference, write_random_checkpoint

torch = pytest.importorskip("torch")


def grad_bound(cfg, width=None):
    """The normwise relative error float32 rounding explains in a gradient (conftest.f32_bound's argument,
    normwise): each reduction of w terms errs by at most w eps relative to its terms (Higham §3.1), and the
    chain is the forward's (embeddings + one per layer, LayerNorm keeping each at unit scale so errors add)
    followed by the backward's mirror of it: depth 2 (layers + 1), width the widest sum max(H, I)."""
    return 2 * (cfg.num_hidden_layers + 1) * (width or max(cfg.hidden_size, cfg.intermediate_size)) * EPS32


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.linalg.norm(want)
    return np.linalg.norm(got - want) / scale if scale > 0 else np.linalg.norm(got)


# ---------------------------------------------------------------- a torch twin of the training forward
# Test-only: BERT with FCA in torch, written from the equations (not from minifca's code), so autograd
# differentiates the same function. It takes from minifca's cache only what is discrete or random: the
# selection (fine units, members and groups of the coarse ones) and the dropout masks.


def torch_params(model, dtype):
    """{canonical name: leaf tensor requiring grad} of a transformers model, in `dtype`."""
    named = {k.removeprefix("bert."): p.detach().to(dtype).clone().requires_grad_(True)
             for k, p in model.named_parameters()}
    return named


def torch_forward(tp, cfg, ids, mask, tt, cache, fca=None):
    F = torch.nn.functional
    dt = tp["embeddings.word_embeddings.weight"].dtype
    lin = lambda x, n: x @ tp[n + ".weight"].T + tp[n + ".bias"]
    ln = lambda x, n: F.layer_norm(x, x.shape[-1:], tp[n + ".weight"], tp[n + ".bias"], cfg.layer_norm_eps)
    act = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, "silu": F.silu}
    act = act[cfg.hidden_act]
    keep = lambda t, k: t if k is None else t * torch.from_numpy(np.asarray(k)).to(dt)
    ids_t, tt_t = torch.from_numpy(ids), torch.from_numpy(tt)
    L = ids.shape[1]
    x0 = (tp["embeddings.word_embeddings.weight"][ids_t] + tp["embeddings.position_embeddings.weight"][:L][None]
          + tp["embeddings.token_type_embeddings.weight"][tt_t])
    x0.retain_grad()
    x = keep(ln(x0, "embeddings.LayerNorm"), cache["emb"]["keep"])
    m = torch.from_numpy((mask > 0).astype(np.float64)).to(dt)
    sizes = m.clone()
    h = cfg.num_attention_heads
    for layer, c in enumerate(cache["layers"]):
        pre = f"encoder.layer.{layer}."
        B, n, H = x.shape
        Q, K, V = (lin(x, pre + "attention.self." + s).reshape(B, n, h, H // h).transpose(1, 2)
                   for s in ("query", "key", "value"))
        bias = torch.where(m > 0, 0.0, float(reference.NEG)).to(dt)
        if fca is not None and fca.proportional_attention:
            bias = bias + torch.log(torch.clamp(sizes, min=1e-30))
        P = torch.softmax(Q @ K.transpose(-1, -2) / math.sqrt(H // h) + bias[:, None, None, :], -1)
        ctx = (keep(P, c["attn"]["keep"]) @ V).transpose(1, 2).reshape(B, n, H)
        x1 = ln(keep(lin(ctx, pre + "attention.output.dense"), c["keep_a"]) + x, pre + "attention.output.LayerNorm")
        if c["fca"] is not None:
            abar = P.mean(1)                                                    # [B, n, n]
            s = {"attention_received": ((abar * m[:, :, None]).sum(1) - torch.diagonal(abar, 0, 1, 2)) * m,
                 "cls_attention": abar[:, 0, :] * m,
                 "attention_entropy": -(abar * torch.log(torch.clamp(abar, min=1e-30))).sum(2) * m,
                 "hidden_norm": x1.norm(dim=-1)}.get(fca.score)
            rows, row_sizes = [], []
            for b, r in enumerate(c["fca"]["rows"]):
                valid = torch.from_numpy(r["valid"])
                xv, sv = x1[b, valid], sizes[b, valid]
                units, usz = [xv[torch.from_numpy(r["fine"])]], [sv[torch.from_numpy(r["fine"])]]
                rest, groups = torch.from_numpy(r["rest"]), torch.from_numpy(r["groups"])
                for g in range(int(groups.max()) + 1 if len(groups) else 0):
                    mem = rest[groups == g]
                    if fca.aggregate in ("weighted", "clusters"):
                        w = torch.softmax(s[b, valid][mem], 0)
                    else:                                                       # mean, similarity: by size
                        w = sv[mem] / sv[mem].sum()
                    units.append((w[:, None] * xv[mem]).sum(0, keepdim=True))
                    usz.append(sv[mem].sum(0, keepdim=True))
                rows.append(torch.cat(units)), row_sizes.append(torch.cat(usz).detach())
            N = max(len(u) for u in rows)
            x1 = torch.stack([F.pad(u, (0, 0, 0, N - len(u))) for u in rows])
            sizes = torch.stack([F.pad(u, (0, N - len(u))) for u in row_sizes])
            m = (sizes > 0).to(dt)
        f = lin(act(lin(x1, pre + "intermediate.dense")), pre + "output.dense")
        x = ln(keep(f, c["keep_f"]) + x1, pre + "output.LayerNorm")
    w = sizes * m
    emb = (x * w[:, :, None]).sum(1) / w.sum(1, keepdim=True)
    pooled = torch.tanh(lin(x[:, 0], "pooler.dense"))
    logits = lin(keep(pooled, cache.get("keep_cls")), "classifier")
    return x0, emb, logits


def batch(rng, vocab, B, L, pad=True, pairs=False):
    ids = rng.integers(1, vocab, (B, L))
    mask = np.ones((B, L), np.int64)
    if pad:                                                          # different lengths, one full row
        for b in range(1, B):
            mask[b, max(2, L - 3 * b):] = 0
    ids[mask == 0] = 0
    tt = np.zeros_like(ids)
    if pairs:
        tt[:, L // 2:] = 1
    return ids, mask, tt * mask


def minifca_grads(params, cfg, ids, mask, tt, labels, proj, fca=None, dropout=0.0, seed=0):
    """loss = cross_entropy(logits, labels) + sum(embeddings * proj): the gradients of every parameter."""
    rng = np.random.default_rng(seed) if dropout else None
    out, cache = grad.forward(params, cfg, ids, mask, tt, fca=fca, dropout=dropout, rng=rng)
    d_logits = grad.cross_entropy(out["logits"], labels)[1]
    d_out = {"logits": d_logits, "embeddings": proj.astype(out["logits"].dtype)}
    grads, d_inputs = grad.backward(params, cfg, cache, d_out)
    return from_params(grads), d_inputs, cache, out


def torch_grads(tp, cfg, ids, mask, tt, labels, proj, cache, fca=None):
    x0, emb, logits = torch_forward(tp, cfg, ids, mask, tt, cache, fca)
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)) + (emb * torch.from_numpy(proj)).sum()
    loss.backward()
    return {k: p.grad.numpy() for k, p in tp.items()}, x0.grad.numpy(), logits.detach().numpy()


def assert_grads_close(got, got_inputs, want, want_inputs, bound):
    errs = {name: rel_err(got[name], want[name]) for name in want if not name.endswith("self.key.bias")}
    for name in [n for n in want if n.endswith("self.key.bias")]:
        # exactly 0 in exact arithmetic (b_k adds q_i . b_k to every logit of row i: the softmax ignores it);
        # what is left is the rounding of sums whose terms are the size of the query bias's gradient
        errs[name] = np.linalg.norm(got[name] - want[name]) / np.linalg.norm(want[name.replace("key", "query")])
    errs["<input embeddings>"] = rel_err(got_inputs, want_inputs)
    worst = max(errs, key=errs.get)
    assert errs[worst] <= bound, f"{worst}: relative error {errs[worst]:.2e} > {bound:.2e}"
    assert set(got) == set(want), set(got) ^ set(want)


SHAPES = [{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64, "hidden_act": "gelu"},
          {"hidden_size": 48, "num_hidden_layers": 3, "num_attention_heads": 3, "intermediate_size": 96,
               "hidden_act": "gelu_new"},
          {"hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 40, "hidden_act": "relu"},
          {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 32, "hidden_act": "silu",
               "num_labels": 3}]


@pytest.fixture(scope="module", params=range(len(SHAPES)), ids=[s["hidden_act"] for s in SHAPES])
def tiny(request, tmp_path_factory):
    shape = SHAPES[request.param]
    folder = write_random_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=request.param, vocab_size=120,
                                     max_position_embeddings=40, **shape)
    return minifca.from_pretrained(folder, backend="numpy"), torch_reference(folder)


# ---------------------------------------------------------------- the forward it caches is the reference's


def test_training_forward_equals_reference(tiny):
    model, _ = tiny
    rng = np.random.default_rng(1)
    ids, mask, tt = batch(rng, 120, 4, 14)
    for fca in (None, FCAConfig(keep=0.5), FCAConfig(keep=0.6, aggregate="clusters", clusters=2,
                                                     proportional_attention=True, score="cls_attention")):
        want = reference.bert_forward(model.params, model.config, ids, mask, tt, fca=fca,
                                      seeds=minifca.fca.sequence_seeds(ids, mask))
        out, _ = grad.forward(model.params, model.config, ids, mask, tt, fca=fca)
        np.testing.assert_array_equal(out["mask"], want["mask"])
        np.testing.assert_array_equal(out["sizes"], want["sizes"])
        np.testing.assert_array_equal(out["last_hidden_state"], want["last_hidden_state"])


def test_training_ops_count_units_as_reference(tiny):
    """grad.Tape's `reduce` records on the FCAState what FCAState.reduce records (units, FLOPs, kinds)."""
    model, _ = tiny
    rng = np.random.default_rng(3)
    ids, mask, tt = batch(rng, 120, 4, 14)
    seeds = minifca.fca.sequence_seeds(ids, mask)
    for fca in (FCAConfig(keep=0.5), FCAConfig(keep=0.6, aggregate="clusters", clusters=2, score="cls_attention")):
        want = reference.bert_forward(model.params, model.config, ids, mask, tt, fca=fca, seeds=seeds)["units"]
        got = reference.bert_forward(model.params, model.config, ids, mask, tt, fca=fca, seeds=seeds,
                                     ops=grad.Tape())["units"]
        assert len(got) == len(want) == model.config.num_hidden_layers
        for g, w in zip(got, want):
            assert set(g) == set(w)
            for name in w:
                np.testing.assert_array_equal(g[name], w[name], err_msg=name)


# ---------------------------------------------------------------- without FCA: against transformers itself


def test_gradients_match_transformers(tiny):
    """Every parameter's gradient and the input embeddings' against transformers' own model (float64)."""
    model, tmodel = tiny
    cfg = model.config
    rng = np.random.default_rng(2)
    ids, mask, tt = batch(rng, 120, 3, 12, pairs=True)
    labels = rng.integers(0, cfg.num_labels, 3)
    proj = rng.standard_normal((3, cfg.hidden_size))
    got, got_inputs, _, _ = minifca_grads(model.params, cfg, ids, mask, tt, labels, proj)
    tm = tmodel.double()
    tm.zero_grad()
    captured = {}

    def keep_output(module, inputs, output):                         # the input embeddings word[ids]
        output.retain_grad()
        captured["x"] = output

    hook = tm.bert.embeddings.word_embeddings.register_forward_hook(keep_output)
    out = tm(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
             token_type_ids=torch.from_numpy(tt), output_hidden_states=True)
    hook.remove()
    x, mk = out.hidden_states[-1], torch.from_numpy(mask).double()
    emb = (x * mk[:, :, None]).sum(1) / mk.sum(1, keepdim=True)
    loss = torch.nn.functional.cross_entropy(out.logits, torch.from_numpy(labels)) + (emb * torch.from_numpy(proj)).sum()
    loss.backward()
    want = {k.removeprefix("bert."): p.grad.numpy() for k, p in tm.named_parameters()}
    # d(word[ids] + position + token_type) = d(word[ids]): the input embeddings' gradient
    assert_grads_close(got, got_inputs, want, captured["x"].grad.numpy(),
                       grad_bound(cfg))


# ---------------------------------------------------------------- FCA: every differentiable rule


RULES = [{"aggregate": "drop"}, {"aggregate": "mean"}, {"aggregate": "weighted"},
         {"aggregate": "clusters", "clusters": 2}, {"aggregate": "weighted", "score": "cls_attention"},
         {"aggregate": "weighted", "score": "attention_entropy"}, {"aggregate": "clusters", "clusters": 3,
                                                                      "score": "attention_entropy"},
         {"aggregate": "weighted", "score": "hidden_norm"}, {"aggregate": "similarity", "clusters": 2}]


@pytest.mark.parametrize("proportional", [False, True], ids=["plain", "proportional"])
@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.get('score', 'received')}-{r['aggregate']}")
def test_fca_gradients_match_torch(tiny, rule, proportional):
    model, tmodel = tiny
    cfg = model.config
    depth = cfg.num_hidden_layers
    keep = [0.7, 0.5, 0.4][:depth] if depth > 1 else [0.5]
    fca = FCAConfig(keep=keep, proportional_attention=proportional, **rule)
    rng = np.random.default_rng(3)
    ids, mask, tt = batch(rng, 120, 4, 16)
    labels = rng.integers(0, cfg.num_labels, 4)
    proj = rng.standard_normal((4, cfg.hidden_size))
    got, got_inputs, cache, out = minifca_grads(model.params, cfg, ids, mask, tt, labels, proj, fca=fca)
    assert any(c["fca"] is not None and any(len(r["rest"]) for r in c["fca"]["rows"]) for c in cache["layers"])
    tp = torch_params(tmodel, torch.float64)
    want, want_inputs, logits = torch_grads(tp, cfg, ids, mask, tt, labels, proj, cache, fca)
    np.testing.assert_allclose(out["logits"], logits, rtol=0, atol=grad_bound(cfg) * np.abs(logits).max())
    assert_grads_close(got, got_inputs, want, want_inputs, grad_bound(cfg))


def test_dropout_gradients_match_torch(tiny):
    """Hidden and attention dropout: torch gets minifca's masks, so both differentiate one function."""
    model, tmodel = tiny
    cfg = model.config
    rng = np.random.default_rng(4)
    ids, mask, tt = batch(rng, 120, 3, 12)
    labels, proj = rng.integers(0, cfg.num_labels, 3), rng.standard_normal((3, cfg.hidden_size))
    fca = FCAConfig(keep=0.5, aggregate="weighted")
    got, got_inputs, cache, _ = minifca_grads(model.params, cfg, ids, mask, tt, labels, proj, fca=fca, dropout=0.2)
    assert cache["layers"][0]["attn"]["keep"] is not None and (cache["layers"][0]["keep_f"] == 0).any()
    want, want_inputs, _ = torch_grads(torch_params(tmodel, torch.float64), cfg, ids, mask, tt, labels, proj,
                                       cache, fca)
    assert_grads_close(got, got_inputs, want, want_inputs, grad_bound(cfg))


def test_float64_gradients_match_torch_tightly(tiny):
    """In float64 the only differences left are rounding (~1e-16 per operation) and, for "gelu", the
    GELU's float32 constants in the reference (the tanh form's sqrt(2/pi) and 0.044715, to 3e-8) and its
    erf (Abramowitz & Stegun, |error| <= 1.5e-7): a bound of 1e-10 (1e-6 with either GELU) catches
    any wrong term that float32's bound could hide. No proportional attention here: the
    reference keeps sizes, hence log sizes, in float32 (log 2 to 3e-8) whatever the weights' dtype."""
    model, tmodel = tiny
    cfg = model.config
    p64 = grad.trainable(model.params)
    cast = lambda t: ({k: cast(v) for k, v in t.items()} if isinstance(t, dict)
                      else [cast(v) for v in t] if isinstance(t, list) else t.astype(np.float64))
    p64 = cast(p64)
    rng = np.random.default_rng(5)
    ids, mask, tt = batch(rng, 120, 4, 16)
    labels, proj = rng.integers(0, cfg.num_labels, 4), rng.standard_normal((4, cfg.hidden_size))
    fca = FCAConfig(keep=0.5, aggregate="clusters", clusters=2)
    got, got_inputs, cache, _ = minifca_grads(p64, cfg, ids, mask, tt, labels, proj, fca=fca)
    want, want_inputs, _ = torch_grads(torch_params(tmodel, torch.float64), cfg, ids, mask, tt, labels, proj,
                                       cache, fca)
    assert_grads_close(got, got_inputs, want, want_inputs, 1e-6 if cfg.hidden_act.startswith("gelu") else 1e-10)


# ---------------------------------------------------------------- finite differences, no torch


def test_finite_differences_float64(tmp_path):
    """Central differences in float64 (step 1e-5: truncation ~h^2 ~ 1e-10, rounding ~1e-16 / h ~ 1e-11),
    on the largest-gradient entry of every tensor, through two FCA layers (weighted, proportional)."""
    folder = write_random_checkpoint(tmp_path, seed=7, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=24, vocab_size=50, max_position_embeddings=16,
                                     hidden_act="gelu_new")
    model = minifca.from_pretrained(folder, backend="numpy")
    cfg = model.config
    cast = lambda t: ({k: cast(v) for k, v in t.items()} if isinstance(t, dict)
                      else [cast(v) for v in t] if isinstance(t, list) else t.astype(np.float64))
    p = cast(grad.trainable(model.params))
    rng = np.random.default_rng(8)
    ids, mask, tt = batch(rng, 50, 3, 10)
    labels, proj = rng.integers(0, 2, 3), rng.standard_normal((3, 16))
    fca = FCAConfig(keep=[0.6, 0.4], aggregate="weighted", proportional_attention=True)

    def loss():
        out, cache = grad.forward(p, cfg, ids, mask, tt, fca=fca)
        return grad.cross_entropy(out["logits"], labels)[0] + float((out["embeddings"] * proj).sum()), out, cache

    _, out, cache = loss()
    d_logits = grad.cross_entropy(out["logits"], labels)[1]
    g = dict(grad.leaves(grad.backward(p, cfg, cache, {"logits": d_logits, "embeddings": proj})[0]))
    h = 1e-5
    for path, a in grad.leaves(p):
        i = np.unravel_index(np.argmax(np.abs(g[path])), a.shape)
        old = a[i]
        a[i] = old + h
        up = loss()[0]
        a[i] = old - h
        down = loss()[0]
        a[i] = old
        fd = (up - down) / (2 * h)
        assert abs(fd - g[path][i]) <= 1e-6 * max(abs(fd), 1e-3), (path, fd, g[path][i])


@pytest.mark.parametrize("act", sorted(set(grad.ACTIVATION_BACKWARDS) - {"gelu"}))
def test_activation_backwards_are_the_forwards_derivatives_float64(act):
    """Each d/dx of reference.ACTIVATIONS against a central difference of the forward, in float64 (step 1e-5:
    truncation h^2 |third derivative| / 6 <= 1e-10 here, rounding eps |f(x)| / h ~ 1e-11 |x|), within 1e-9 of the
    derivative's scale. "gelu" is left out: its forward's erf is an approximation (to 1.5e-7) whose
    derivative the backward does not copy (it uses the exact one)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(2000) * 3
    x = np.sign(x) * (np.abs(x) + 0.01)                               # away from relu's kink at 0
    h = 1e-5
    f = reference.ACTIVATIONS[act]
    fd = (f(x + h) - f(x - h)) / (2 * h)
    got = grad.ACTIVATION_BACKWARDS[act](np.ones_like(x), x)
    assert got.dtype == np.float64
    assert np.abs(got - fd).max() <= 1e-9 * max(1.0, np.abs(fd).max()), act


# ---------------------------------------------------------------- the shared fine-tune


def test_shared_finetune_gradients_match_torch():
    model = minifca.from_pretrained(SST2_MODEL, backend="numpy")
    cfg = model.config
    enc = model.tokenize(["a gripping , beautifully acted film .", "dull .", 
                          "it never quite finds its footing , though the cast tries hard ."])
    ids, mask, tt = enc.input_ids, enc.attention_mask, enc.token_type_ids
    labels, proj = np.array([1, 0, 0]), np.random.default_rng(9).standard_normal((3, cfg.hidden_size)) * 0.1
    fca = FCAConfig(keep=0.5, start_layer=1, aggregate="weighted")
    tp = torch_params(torch_reference(SST2_MODEL), torch.float64)
    for f in (None, fca):
        got, got_inputs, cache, _ = minifca_grads(model.params, cfg, ids, mask, tt, labels, proj, fca=f)
        for t in tp.values():
            t.grad = None
        want, want_inputs, _ = torch_grads(tp, cfg, ids, mask, tt, labels, proj, cache, f)
        assert_grads_close(got, got_inputs, want, want_inputs, grad_bound(cfg))


# ---------------------------------------------------------------- the optimizer


def test_adamw_steps_equal_torch():
    rng = np.random.default_rng(10)
    params = {"a": rng.standard_normal((5, 3)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}
    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    kw = {"lr": 1e-2, "betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 0.05}
    opt, topt = AdamW(params, **kw), torch.optim.AdamW(list(tparams.values()), foreach=False, **kw)
    for step in range(3):
        grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
        for k, t in tparams.items():
            t.grad = torch.from_numpy(grads[k])
        opt.step(grads)
        topt.step()
        for k, p in params.items():
            # the same float32 operations in the same order: a few ulp of the parameters
            np.testing.assert_allclose(p, tparams[k].detach().numpy(), rtol=0, atol=4 * EPS32 * np.abs(p).max())


# ---------------------------------------------------------------- the Numba kernels of a training step


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu", "silu"])
def test_numba_activation_kernels_match_numpy(act):
    from minifca.kernels import cpu_grad
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((64, 96)) * 3).astype(np.float32)
    dy = rng.standard_normal((64, 96)).astype(np.float32)
    # kernels.cpu's _exp errs by <= 8e-8 relative (libm's expf: 6e-8), and the same polynomials are evaluated
    # in the same order: a handful of roundings apart, f32_bound's width 8 at depth 1
    assert_f32_close(cpu_grad.activation(x, act), reference.ACTIVATIONS[act](x), depth=1, width=8, what=act)
    assert_f32_close(cpu_grad.activation_backward(dy, x, act), grad.ACTIVATION_BACKWARDS[act](dy, x), depth=1,
                     width=8, what=f"d {act}")


def test_numba_adamw_matches_numpy():
    from minifca.kernels import cpu_grad
    rng = np.random.default_rng(12)
    a = {"w": rng.standard_normal((40, 30)).astype(np.float32), "b": rng.standard_normal(30).astype(np.float32)}
    b = {k: v.copy() for k, v in a.items()}
    kw = {"lr": 1e-2, "weight_decay": 0.1, "no_decay": ["b"]}
    plain, fused = AdamW(a, **kw), AdamW(b, update=cpu_grad.adamw_update, **kw)
    for _ in range(3):
        g = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in a.items()}
        plain.step(g)
        fused.step({k: v.copy() for k, v in g.items()})
    for k in a:   # noqa: PLC0206 - the same float32 operations per element, in the same order: a few ulp of the parameters
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=4 * EPS32 * np.abs(a[k]).max())
        np.testing.assert_allclose(fused.v[k], plain.v[k], rtol=0, atol=4 * EPS32 * np.abs(plain.v[k]).max())


def test_numba_adamw_refuses_a_layout_it_would_not_update():
    """A Fortran-ordered weight has no flat view: the update would land in a
    copy and be lost, so the fused update refuses it; grad.trainable hands the optimizer C-ordered copies."""
    from minifca.kernels import cpu_grad
    w = np.asfortranarray(np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        AdamW({"w": w}, update=cpu_grad.adamw_update).step({"w": np.ones((4, 3), np.float32)})
    params = grad.trainable({"layers": [{"attn": {"q": {"w": w, "b": np.zeros(4, np.float32)}}}]})
    assert all(a.flags.c_contiguous for _, a in grad.leaves(params))
    np.testing.assert_array_equal(params["layers"][0]["attn"]["q"]["w"], w)


def test_training_step_with_numba_kernels_matches_numpy(tiny):
    from minifca.kernels import cpu_grad
    model, _ = tiny
    cfg = model.config
    rng = np.random.default_rng(13)
    ids, mask, tt = batch(rng, 120, 3, 12)
    fca = FCAConfig(keep=0.5)
    outs = []
    for ops in (None, cpu_grad):
        out, cache = grad.forward(model.params, cfg, ids, mask, tt, fca=fca, ops=ops)
        d = grad.cross_entropy(out["logits"], np.array([0, 1, 0]) % cfg.num_labels)[1]
        outs.append(from_params(grad.backward(model.params, cfg, cache, {"logits": d})[0]))
    for name, want in outs[0].items():
        assert rel_err(outs[1][name], want) <= grad_bound(cfg) or name.endswith("key.bias"), name
