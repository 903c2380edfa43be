"""backend="cuda" (minifca/kernels/cuda.py) against the NumPy reference, under Numba's CUDA simulator.

CI has no GPU, so the kernels run in the simulator: NUMBA_ENABLE_CUDASIM must be set before
numba.cuda is first imported (numba re-reads its config at every compile, so it stays set; it
changes nothing for CPU-only Numba). Shapes are tiny because the simulator runs every GPU thread
as a Python thread. The same comparisons on a real GPU: benchmarks/bench_cuda.py --parity.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
from numba.core import config as numba_config

numba_config.reload_config()

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minifca import reference
from minifca.config import BertConfig
from minifca.fca import FCAConfig
from minifca.kernels import cuda as kc

from conftest import f32_bound

CFG = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=12, max_position_embeddings=16, layer_norm_eps=1e-12)


def random_params(cfg, seed=0):
    rng = np.random.default_rng(seed)
    r = lambda *s: (rng.standard_normal(s) * 0.5).astype(np.float32)
    lin = lambda o, i: {"w": r(o, i), "b": r(o)}
    ln = lambda: {"g": 1 + r(cfg.hidden_size), "b": r(cfg.hidden_size)}
    H, I = cfg.hidden_size, cfg.intermediate_size
    return {"embeddings": {"word": r(cfg.vocab_size, H), "position": r(cfg.max_position_embeddings, H),
                           "token_type": r(cfg.type_vocab_size, H), "ln": ln()},
            "layers": [{"attn": {"q": lin(H, H), "k": lin(H, H), "v": lin(H, H), "o": lin(H, H)},
                        "attn_ln": ln(), "ffn": {"i": lin(I, H), "o": lin(H, I)}, "ffn_ln": ln()}
                       for _ in range(cfg.num_hidden_layers)]}


def batch(seed=0, B=3, L=9):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, CFG.vocab_size, (B, L))
    lengths = [L] + list(rng.integers(2, L + 1, B - 1))
    mask = (np.arange(L)[None] < np.array(lengths)[:, None]).astype(np.int64)
    tt = (np.arange(L)[None] >= L // 2).astype(np.int64) * mask
    return ids * mask, mask, tt


@pytest.fixture(scope="module", autouse=True)
def fast_simulator():
    """The simulator's scheduler polls its GPU threads while holding the GIL: a short switch
    interval makes these tests ~10x faster. Restored afterwards."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(old)


@pytest.fixture(scope="module")
def params():
    return random_params(CFG)


@pytest.fixture(scope="module")
def ops(params):
    return kc.CudaOps(params)


# The deepest comparison here is a whole forward of CFG: the embeddings, each layer, pooler and classifier
# chain (num_hidden_layers + 3 reductions), the widest sum max(H, I, positions) terms (see conftest.f32_bound).
DEPTH = CFG.num_hidden_layers + 3
WIDTH = max(CFG.hidden_size, CFG.intermediate_size, CFG.max_position_embeddings)


def close(a, b, depth=DEPTH, width=WIDTH):
    """a == b (the reference) up to float32 rounding of `depth` chained sums of `width` terms."""
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               atol=f32_bound(b, depth, width), rtol=0)


def test_simulator_in_use():
    assert kc.simulated(), "NUMBA_ENABLE_CUDASIM was not honoured: numba.cuda was imported earlier"


@pytest.mark.parametrize("tiles", ["64x64", "64x64c"])         # a thread's outputs strided / side by side
@settings(max_examples=4)
@given(M=st.integers(1, 19), K=st.integers(1, 21), N=st.integers(1, 13))
def test_linear_tiles_any_shape(tiles, M, K, N):
    rng = np.random.default_rng(M * 1000 + K * 10 + N)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((M, K), (N, K), (N,)))
    close(kc.CudaOps(tiles=tiles).linear(x, w, b), reference.linear(x, w, b))


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu", "silu"])
def test_ffn_activations(ops, params, act):
    x = np.random.default_rng(1).standard_normal((2, 5, CFG.hidden_size)).astype(np.float32)
    p = params["layers"][0]["ffn"]
    close(ops.ffn(x, **p, act=act), reference.ffn(x, **p, act=act))


def test_embeddings_and_layer_norm(ops, params):
    ids, _mask, tt = batch()
    e = params["embeddings"]
    close(ops.embeddings(ids, tt, **e, eps=CFG.layer_norm_eps), reference.embeddings(ids, tt, **e, eps=CFG.layer_norm_eps))
    rng = np.random.default_rng(2)
    x, r = rng.standard_normal((2, 2, 3, CFG.hidden_size)).astype(np.float32)
    ln = params["layers"][0]["attn_ln"]
    close(ops.add_layer_norm(x, r, **ln, eps=1e-5), reference.add_layer_norm(x, r, **ln, eps=1e-5))


@pytest.mark.parametrize("proportional, n_head", [(False, 4), (True, 4), (False, 1)])
def test_attention_probs_stats_keys(ops, params, proportional, n_head):
    """n_head 4: head size 2 < the simulator's 4 threads (keys split among thread groups); 1: 8 > 4."""
    ids, mask, _tt = batch(3)
    x = np.random.default_rng(3).standard_normal((*ids.shape, CFG.hidden_size)).astype(np.float32)
    mask = mask.astype(np.float32)
    log_size = np.log(np.maximum(mask * np.arange(1, ids.shape[1] + 1), 1e-30)).astype(np.float32) if proportional else None
    p = params["layers"][1]["attn"]
    got = ops.attention(x, mask, log_size, **p, n_head=n_head, want_stats=True)
    want = reference.attention(x, mask, log_size, **p, n_head=n_head, want_stats=True)
    for g, w in zip(got[:2] + got[3:], want[:2] + want[3:]):      # output, probs, keys
        close(g, w)
    for name in want[2]:
        close(got[2][name], want[2][name])
    stats = ops.attention_stats(want[1], mask)                     # the stats kernel on its own
    for name in want[2]:
        close(stats[name], want[2][name])


def launches(monkeypatch, ops):
    """Spy on ops' kernels (kernels.cuda.KERNEL_NAMES): a list of (name, shapes of the array arguments) per launch."""
    from minifca.kernels.cuda import KERNEL_NAMES
    seen = []

    class Spy:
        def __init__(self, name, kern):
            self.name, self.kern = name, kern

        def __getitem__(self, cfg):
            run = self.kern[cfg]
            return lambda *args: seen.append((self.name, [a.shape for a in args if np.ndim(a)])) or run(*args)
    monkeypatch.setattr(ops, "kern", SimpleNamespace(**{**vars(ops.kern), **{n: Spy(n, getattr(ops.kern, n))
                                                                         for n in KERNEL_NAMES}}))
    return seen


def no_probs_buffer(seen, ops):
    """No kernel got a [B, h, n, n] array (the dummy [1, 1, 1, 1] aside), and none was allocated."""
    return "probs" not in ops._ws and all(len(s) < 4 or np.prod(s) == 1 for _, shapes in seen for s in shapes)


@pytest.mark.parametrize("proportional, n_head", [(False, 4), (True, 4), (True, 1)])
def test_attention_abar_stats_without_probs(ops, params, proportional, n_head, monkeypatch):
    """want_stats without want_probs: the attention_abar kernel (heads in turn, Abar in shared memory), then
    stats from Abar [B, n, n]: output, keys and statistics as the reference's, no [B, h, n, n] array, and the
    same bits on a second run. Masks with right padding and holes (the first unit too)."""
    ids, mask, _tt = batch(6)
    mask = mask.astype(np.float32)
    mask[1, 2] = mask[2, 0] = 0
    x = np.random.default_rng(6).standard_normal((*ids.shape, CFG.hidden_size)).astype(np.float32)
    sizes = mask * (1 + np.arange(ids.shape[1]) % 3)                # units of 1, 2, 3 tokens
    log_size = np.log(np.maximum(sizes, 1e-30)).astype(np.float32) if proportional else None
    p = params["layers"][0]["attn"]
    seen = launches(monkeypatch, ops)
    ops._ws.pop("probs", None)                                     # allocated by earlier tests
    got = ops.attention(x, mask, log_size, **p, n_head=n_head, want_probs=False, want_stats=True)
    assert [name for name, _ in seen if "attention" in name or name == "head_mean"] == ["attention_abar"]
    assert no_probs_buffer(seen, ops), seen
    want = reference.attention(x, mask, log_size, **p, n_head=n_head, want_stats=True)
    assert got[1] is None
    close(got[0], want[0])
    close(got[3], want[3])
    for name in want[2]:
        close(got[2][name], want[2][name])
    again = ops.attention(x, mask, log_size, **p, n_head=n_head, want_probs=False, want_stats=True)
    assert np.array_equal(again[0], got[0]) and all(np.array_equal(again[2][k], got[2][k]) for k in got[2])


def test_forward_full_with_hidden_states_and_attentions(ops, params):
    ids, mask, tt = batch(4)
    kw = {"output_hidden_states": True, "output_attentions": True}
    got = reference.bert_forward(params, CFG, ids, mask, tt, ops=ops, **kw)
    want = reference.bert_forward(params, CFG, ids, mask, tt, **kw)
    close(got["last_hidden_state"], want["last_hidden_state"])
    for g, w in zip(got["hidden_states"] + got["attentions"], want["hidden_states"] + want["attentions"]):
        close(g, w)
    assert got["units"] is None and np.array_equal(got["mask"], want["mask"])


FCA_RULES = [
    FCAConfig(keep=0.5),                                                          # the paper's rule
    FCAConfig(keep=[0.7, 0.4], score="cls_attention", aggregate="drop"),
    FCAConfig(keep=[5, 3], score="attention_entropy", aggregate="clusters", clusters=2),
    FCAConfig(keep=0.6, score="hidden_norm", aggregate="mean", proportional_attention=True),
    FCAConfig(keep=0.5, score="random", aggregate="similarity", clusters=2, seed=3, start_layer=1),
]


def spy(monkeypatch, name):
    """Record the layers at which kernels/cuda's `name` (decide_on_host or count_units) runs."""
    calls, original = [], getattr(kc, name)

    def wrapped(state, layer, *args, **kw):
        calls.append(layer)
        return original(state, layer, *args, **kw)
    monkeypatch.setattr(kc, name, wrapped)
    return calls


@pytest.mark.parametrize("fca", FCA_RULES, ids=lambda f: f"{f.score}-{f.aggregate}")
def test_forward_fca_matches_reference(ops, params, fca, monkeypatch):
    """trace=True: every rule decides on the host (decide_on_host), and the trace is the reference's."""
    from minifca.fca import sequence_seeds
    ids, mask, tt = batch(5)
    seeds = sequence_seeds(ids, mask)
    host_calls, device_calls = spy(monkeypatch, "decide_on_host"), spy(monkeypatch, "count_units")
    got = reference.bert_forward(params, CFG, ids, mask, tt, ops=ops, fca=fca, seeds=seeds, trace=True)
    assert host_calls == [layer for layer in range(CFG.num_hidden_layers) if fca.active(layer)] and not device_calls
    want = reference.bert_forward(params, CFG, ids, mask, tt, fca=fca, seeds=seeds, trace=True)
    assert np.array_equal(got["mask"], want["mask"]) and got["mask"].shape[1] < ids.shape[1]
    close(got["sizes"], want["sizes"])
    close(got["last_hidden_state"], want["last_hidden_state"])
    assert got["trace"] == want["trace"]                           # identical selections and weights
    for g, w in zip(got["units"], want["units"]):
        assert all(np.array_equal(g[k], w[k]) for k in w)


# ---------------------------------------------------------------- FCA decided on the device


@pytest.mark.parametrize("aggregate", ["drop", "mean", "weighted", "clusters"])
def test_reduce_batch_matches_fca_reduce_batch(ops, aggregate):
    """fca_select + merge against fca.reduce_batch: scores from three levels (ties at every cut),
    masks with holes anywhere (the first unit too) and right padding, inactive rows, c from 1 to 3."""
    from minifca import fca as F
    rng = np.random.default_rng(["drop", "mean", "weighted", "clusters"].index(aggregate))
    for trial in range(3):
        B, n, H = 4, 10, 3
        valid = rng.random((B, n)) < 0.7
        valid[0] = True                                                 # all valid
        valid[1, :] = np.arange(n) < 1 + trial * 3                      # right padding (one unit only, at first)
        valid[2, 0] = False                                             # [CLS] is the first valid unit
        x = rng.normal(size=(B, n, H)).astype(np.float32)
        sizes = (rng.integers(1, 4, (B, n)) * valid).astype(np.float32)
        s = rng.integers(0, 3, (B, n)).astype(np.float64)
        nv = valid.sum(1)
        k = np.array([rng.integers(1, v + 1) for v in nv])
        m = nv - k
        c = np.zeros(B, np.int64) if aggregate == "drop" else np.minimum(
            rng.integers(1, 4, B) if aggregate == "clusters" else 1, m)
        active = (m > 0) & ((aggregate == "drop") | (c < m))
        active[3] &= trial != 1                                         # a row left alone although it could shrink
        c = np.where(active, c, 0)
        want = F.reduce_batch(s, x, sizes, valid, k, c, active, aggregate)
        got = ops.reduce_batch(s, x, sizes, valid, k, c, active, aggregate)
        assert got[0].shape == want[0].shape and got[0].dtype == want[0].dtype and got[1].dtype == want[1].dtype
        np.testing.assert_array_equal(got[1], want[1])
        assert np.abs(got[0] - want[0]).max() <= f32_bound(want[0], depth=1, width=n)   # one weighted sum over <= n units


# a smaller model for the many forwards below (the simulator's time grows with the attention blocks)
CFG2 = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=12, max_position_embeddings=16, layer_norm_eps=1e-12)


@pytest.fixture(scope="module")
def small():
    params = random_params(CFG2, seed=1)
    return kc.CudaOps(params), params


def small_batch():
    """Two sequences: eight tokens; six with a hole (valid tokens 0, 1, 3, 4, 5, 6)."""
    ids = np.array([[2, 7, 9, 11, 4, 13, 21, 3], [2, 5, 0, 6, 8, 17, 3, 0]])
    mask = np.array([[1] * 8, [1, 1, 0, 1, 1, 1, 1, 0]])
    return ids * mask, mask, (np.arange(8)[None] >= 4).astype(np.int64) * mask


@pytest.mark.parametrize("aggregate", ["drop", "mean", "weighted", "clusters"])
@pytest.mark.parametrize("score", ["attention_received", "cls_attention", "hidden_norm", "attention_entropy"])
def test_forward_fca_on_device_matches_reference(small, score, aggregate, monkeypatch):
    """Every batchable rule: decided on the device (no decide_on_host), same units, sizes and states as the
    reference, and nothing copied back but the outputs (the last hidden states, the sizes)."""
    from minifca.fca import sequence_seeds
    ops, params = small
    ids, mask, tt = small_batch()
    fca = FCAConfig(keep=[4, 3], score=score, aggregate=aggregate, clusters=2 if aggregate == "clusters" else 1,
                    proportional_attention=aggregate != "drop")
    seeds = sequence_seeds(ids, mask)
    host_calls, device_calls = spy(monkeypatch, "decide_on_host"), spy(monkeypatch, "count_units")
    copies = []
    array_type = type(ops.cuda.to_device(np.zeros(1)))
    plain_copy = array_type.copy_to_host
    monkeypatch.setattr(array_type, "copy_to_host", lambda self, *a, **kw: copies.append(self.shape) or
                        plain_copy(self, *a, **kw))
    got = reference.bert_forward(params, CFG2, ids, mask, tt, ops=ops, fca=fca, seeds=seeds)
    monkeypatch.undo()
    assert host_calls == [] and device_calls == [0, 1]
    assert len(copies) == 2, copies                                      # last_hidden_state and sizes
    want = reference.bert_forward(params, CFG2, ids, mask, tt, fca=fca, seeds=seeds)
    assert np.array_equal(got["mask"], want["mask"]) and got["mask"].shape[1] < ids.shape[1]
    assert np.array_equal(got["sizes"], want["sizes"]) and got["sizes"].dtype == want["sizes"].dtype
    close(got["last_hidden_state"], want["last_hidden_state"])
    for g, w in zip(got["units"], want["units"]):
        assert all(np.array_equal(g[k], w[k]) for k in w)


@pytest.mark.parametrize("score, attentions", [("attention_received", False), ("random", False),
                                               ("attention_received", True)])
def test_forward_fca_layer_allocates_no_probs(small, score, attentions, monkeypatch):
    """A full layer (0), then an FCA layer (1), decided on the device or (random) on the host: the FCA
    layer runs attention_abar and no kernel sees or allocates [B, h, n, n], unless the attentions are
    asked for (then attention writes them and head_mean averages them for stats)."""
    from minifca.fca import sequence_seeds
    _, params = small
    ops = kc.CudaOps(params)                                              # a fresh workspace
    ids, mask, tt = small_batch()
    fca, seeds = FCAConfig(keep=0.5, score=score, start_layer=1, seed=2), sequence_seeds(ids, mask)
    seen = launches(monkeypatch, ops)
    got = reference.bert_forward(params, CFG2, ids, mask, tt, ops=ops, fca=fca, seeds=seeds, output_attentions=attentions)
    attn = [name for name, _ in seen if "attention" in name or name == "head_mean"]
    if attentions:
        assert attn == ["attention", "attention", "head_mean"]
    else:
        assert attn == ["attention", "attention_abar"] and no_probs_buffer(seen, ops), seen
        assert [s for name, s in seen if name == "attention_abar"] == [[(16, 24), (2, 8), (2, 8), (16, 8), (2, 8, 8)]]
    want = reference.bert_forward(params, CFG2, ids, mask, tt, fca=fca, seeds=seeds, output_attentions=attentions)
    assert np.array_equal(got["mask"], want["mask"]) and got["mask"].shape[1] < ids.shape[1]
    close(got["last_hidden_state"], want["last_hidden_state"])
    for g, w in zip(got["attentions"] or [], want["attentions"] or []):
        close(g, w)


@pytest.mark.parametrize("fca", [FCAConfig(keep=[4, 3], score="random", seed=1),
                                 FCAConfig(keep=[5, 4], aggregate="similarity", clusters=2)],
                         ids=lambda f: f"{f.score}-{f.aggregate}")
def test_forward_other_rules_decide_on_the_host(small, fca, monkeypatch):
    from minifca.fca import sequence_seeds
    ops, params = small
    ids, mask, tt = small_batch()
    seeds = sequence_seeds(ids, mask)
    host_calls, device_calls = spy(monkeypatch, "decide_on_host"), spy(monkeypatch, "count_units")
    got = reference.bert_forward(params, CFG2, ids, mask, tt, ops=ops, fca=fca, seeds=seeds)
    assert host_calls == [0, 1] and device_calls == []
    want = reference.bert_forward(params, CFG2, ids, mask, tt, fca=fca, seeds=seeds)
    assert np.array_equal(got["mask"], want["mask"]) and got["mask"].shape[1] < ids.shape[1]
    close(got["sizes"], want["sizes"])
    close(got["last_hidden_state"], want["last_hidden_state"])


def test_a_rule_registered_in_one_place_is_decided_on_the_device(small, new_rules, monkeypatch):
    """`new_rules` registers a score and an aggregate with batched facts, and nothing else: their layers are
    decided on the device (count_units, no decide_on_host), with the per-sequence reference loop's units."""
    from minifca.fca import sequence_seeds
    ops, params = small
    ids, mask, tt = small_batch()
    score, aggregate = new_rules
    fca, seeds = FCAConfig(keep=[5, 3], score=score, aggregate=aggregate, clusters=2), sequence_seeds(ids, mask)
    host_calls, device_calls = spy(monkeypatch, "decide_on_host"), spy(monkeypatch, "count_units")
    got = reference.bert_forward(params, CFG2, ids, mask, tt, ops=ops, fca=fca, seeds=seeds)
    assert host_calls == [] and device_calls == [0, 1]
    want = reference.bert_forward(params, CFG2, ids, mask, tt, fca=fca, seeds=seeds, trace=True)  # one sequence at a time
    assert np.array_equal(got["mask"], want["mask"]) and got["mask"].shape[1] < ids.shape[1]
    assert np.array_equal(got["sizes"], want["sizes"])
    close(got["last_hidden_state"], want["last_hidden_state"])


def test_model_backend_cuda_uploads_once(tmp_path):
    import minifca

    from conftest import write_random_checkpoint
    folder = write_random_checkpoint(tmp_path / "tiny", hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=12, vocab_size=60, max_position_embeddings=16)
    model = minifca.from_pretrained(folder, backend="cuda")
    ref = minifca.from_pretrained(folder)
    assert kc.ops_for(model) is model.ops                           # built once, kept on the model
    dev = model.ops.dev
    ids = np.array([[2, 7, 9, 11, 4, 3, 0], [2, 5, 6, 3, 0, 0, 0]])
    mask = (ids > 0).astype(np.int64)
    for fca in (None, FCAConfig(keep=0.5)):
        got, want = model.forward(ids, mask, fca=fca), ref.forward(ids, mask, fca=fca)
        valid = want.mask > 0                                       # the numba model computes no padding
        close(got.last_hidden_state[valid], want.last_hidden_state[valid])
        close(got.logits, want.logits)
        assert got.flops == want.flops
    assert model.ops.dev is dev                                     # weights not uploaded again


def test_kernel_profile_accounts_for_the_forward(tmp_path):
    """bench_cuda.kernel_profile: every kernel of an FCA forward is timed, and the parts add up to the total;
    the paper's rule is decided on the device, so the host only counts (no decide_on_host)."""
    import minifca
    from minifca.bench_cuda import kernel_profile
    from minifca.kernels.cuda import KERNEL_NAMES

    from conftest import write_random_checkpoint
    folder = write_random_checkpoint(tmp_path / "tiny", hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=12, vocab_size=60, max_position_embeddings=16)
    model = minifca.from_pretrained(folder, backend="cuda")
    ids = np.array([[2, 7, 9, 11, 4, 3], [2, 5, 6, 8, 3, 0]])
    p = kernel_profile(model, ids, (ids > 0).astype(np.int64), FCAConfig(keep=0.5, start_layer=1), repeats=1)
    idle = ("fca_norms", "head_mean")             # hidden_norm's score only; Abar from probabilities only
    launched = [name for name in KERNEL_NAMES if name not in idle]  # attention (layer 0), attention_abar (1)
    assert all(p["ms"][name] > 0 for name in launched + ["fca counts (host)"]), p
    assert all(p["ms"][name] == 0 for name in idle + ("fca plan (host)",)), p
    assert abs(sum(p["ms"].values()) - p["total_ms"]) < 1e-6 * p["total_ms"] + 1e-9
    assert model.ops.kern.matmul_bias_act is kc.kernels(True, kc.DEFAULT_TILES).matmul_bias_act  # restored


def _run(code, **env):
    full = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    full.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full,
                          timeout=120, check=False)


def test_no_gpu_gives_a_backend_error_naming_the_driver(tmp_path):
    """Without a driver (forced by pointing Numba at a file that is none): a BackendError, not a crash."""
    fake = tmp_path / "libcuda.so"
    fake.write_bytes(b"not a driver")
    r = _run("""
        import minifca
        try:
            minifca.from_pretrained(minifca.default_model_path(), backend="cuda")
        except minifca.BackendError as e:
            print("BackendError:", e)
        """, NUMBA_CUDA_DRIVER=str(fake))
    assert r.returncode == 0, r.stderr
    assert "BackendError: backend 'cuda' cannot run here" in r.stdout and "driver" in r.stdout.lower(), r.stdout


def test_bench_cuda_without_gpu_is_a_clear_error(tmp_path):
    """`minifca bench --backend cuda` on a machine with no driver: the BackendError, before any work."""
    fake = tmp_path / "libcuda.so"
    fake.write_bytes(b"not a driver")
    r = _run("""
        import sys
        from minifca.cli import main
        sys.exit(main(["bench", "--backend", "cuda", "--quick", "--weights", sys.argv[1]]))
        """.replace("sys.argv[1]", repr(str(tmp_path / "w"))), NUMBA_CUDA_DRIVER=str(fake))
    assert r.returncode != 0
    assert "backend 'cuda' cannot run here" in r.stderr and "driver" in r.stderr.lower(), r.stderr
    assert not (tmp_path / "w").exists()                             # no checkpoint written first


def test_nothing_imports_cuda_at_import_time():
    r = _run("""
        import sys, minifca, minifca.model, minifca.cli, minifca.reference, minifca.fca
        print(sorted(m for m in sys.modules if m.startswith(("numba.cuda", "numba_cuda"))))
        """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_simulator_gives_every_thread_of_a_block_the_same_shared_array():
    """Numba's simulator looks a shared array up by source line, then inserts it: unpatched, threads
    interleaving there got arrays of their own (~4% of these trials), and kernels read memory their
    block never wrote (rare wrong tiles and forwards). kernels() makes the look-up atomic."""
    import sys
    import threading

    from numba.cuda.simulator import kernelapi
    kc.kernels(True)                                                 # installs the fix
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)                                      # threads switch as often as they can
    try:
        for _ in range(400):
            shared, got, start = kernelapi.FakeCUDAShared(0), [], threading.Barrier(8)

            def thread(start=start, got=got, shared=shared):
                start.wait()
                got.append(shared.array((64,), np.float32))
            threads = [threading.Thread(target=thread) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len({id(a) for a in got}) == 1
    finally:
        sys.setswitchinterval(interval)
