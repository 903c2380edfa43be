"""Fast paths beside the NumPy reference, each function named after the one it replaces, and the ops contract.

`cpu`  Numba kernels (backend="numba", the default): `import minifca.kernels.cpu as ops`.
`cuda` numba.cuda kernels (backend="cuda"): `minifca.kernels.cuda.CudaOps(params)`.

Nothing of either is imported here, so choosing one backend never compiles or initialises another.

The ops contract
----------------
`reference.bert_forward` is the one loop over layers; every backend runs it, handing it `ops`:
`minifca.reference` itself (backend="numpy"), the module `kernels.cpu`, or a `kernels.cuda.CudaOps`.
These are all it calls on `ops`, and every backend provides exactly these, with these arguments
(tests/test_architecture.py checks both). Shapes: B batch, L tokens, n units, h heads, H hidden,
I intermediate; an "activation" is whatever array type the backend keeps activations in (NumPy on
the CPU; device arrays, with the same shapes, on the GPU); masks, sizes' counts and FCA's decisions
stay NumPy arrays on the host.

    resident_params(params) -> params            the nested parameter dict as the backend reads it
                                                 (the GPU: uploaded once per model, same keys)
    embeddings(ids, tt, word, position, token_type, ln, eps) -> x
                                                 ids, tt [B, L] int64 (host) -> x [B, L, H]
    pack(x, mask) -> x                           the layout the layers run in: x itself (NumPy, GPU), or
                                                 the valid units only (numba: kernels.cpu.Packed, for
                                                 right-padded masks); every op below takes and gives
                                                 back that layout, to_host pads it back to [B, n, H]
    attention(x, mask, log_size, q, k, v, o, n_head, want_probs, want_stats) -> out, probs, stats, keys
                                                 x [B, n, H], mask [B, n] (host), log_size [B, n] or None
                                                 -> out [B, n, H]; probs [B, h, n, n] (or None unless
                                                 want_probs); stats {received, cls, entropy: [B, n]}
                                                 (None unless want_stats); keys [B, n, H] (the GPU keeps
                                                 them inside its fused QKV buffer)
    add_layer_norm(x, residual, g, b, eps) -> y  [B, n, H] + [B, n, H] -> [B, n, H] (the GPU writes
                                                 over `residual`, which the loop no longer needs)
    ffn(x, i, o, act) -> y                       [B, n, H] -> [B, n, I] -> [B, n, H]
    log_size(sizes) -> [B, n]                    proportional attention's bias, log(size)
    reduce(state, layer, cfg, x, mask, sizes, stats, keys) -> x, mask, sizes
                                                 one FCA layer: x [B, n, H], mask, sizes [B, n] ->
                                                 [B, n', H], [B, n'] (host), [B, n']; decides and records
                                                 on `state` (fca.FCAState), batched layers by reduce_batch
    reduce_batch(s, x, sizes, valid, k, c, active, aggregate) -> new_x, new_sizes
                                                 fca.reduce_batch: s [B, n] scores, x [B, n, H],
                                                 sizes [B, n], valid [B, n] bool, k, c [B] int64,
                                                 active [B] bool -> [B, N, H], [B, N]
    to_host(a) -> np.ndarray                     an activation (or sizes) as a NumPy array
"""
from __future__ import annotations

from .. import fca

# name -> its arguments, in order (the contract above)
OPS = {
    "resident_params": ("params",),
    "embeddings": ("ids", "tt", "word", "position", "token_type", "ln", "eps"),
    "pack": ("x", "mask"),
    "attention": ("x", "mask", "log_size", "q", "k", "v", "o", "n_head", "want_probs", "want_stats"),
    "add_layer_norm": ("x", "residual", "g", "b", "eps"),
    "ffn": ("x", "i", "o", "act"),
    "log_size": ("sizes",),
    "reduce": ("state", "layer", "cfg", "x", "mask", "sizes", "stats", "keys"),
    "reduce_batch": ("s", "x", "sizes", "valid", "k", "c", "active", "aggregate"),
    "to_host": ("a",),
}


def aggregate_code(aggregate: str) -> int:
    """How the compiled reductions (cpu `_reduce_rows`, cuda `fca_select`) weigh a batched aggregation rule,
    from its registered facts: 0 no coarse unit (drop), 1 size-weighted mean, 2 softmax of the scores."""
    facts = fca.aggregate_facts(aggregate)
    return 0 if facts.coarse_units == "none" else {"sizes": 1, "softmax": 2}[facts.weights]
