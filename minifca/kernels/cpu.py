"""The Numba CPU backend: `reference.py`'s compute functions, same names, same signatures, compiled.

Each public function here mirrors the reference function of the same name and is tested
against it (tests/test_kernels.py). What changes is how the work is done, not what it is:

- matrix products with the weights are `_linear_rows`: x @ w^T + b in register tiles of 6 rows by 32 outputs
  (`_panel_tile`, LLVM vector code: 12 accumulators of 16 floats, one fused multiply-add per product), on the
  weights laid out once at load in panels of 32 outputs (`lay_out`; the [out, in] arrays stay memory-mapped for
  every other reader), one parallel task per block of rows and two panels, each panel's first two tiles fetching
  the next panel from memory ahead (`_panel_tile_ahead`). Against NumPy's OpenBLAS it is
  up to 2.9x faster from 4 rows to 2048 on 1 or 2 threads, and never more than 4% slower (benchmarks/linear_rows.py,
  docs/bench_numba.md);
  every output is the same sum whatever the batch around its row, and the forward runs on Numba's pool alone
  (no hand-off to OpenBLAS's threads between kernels);
- everything between two matrix products is one parallel Numba loop over rows: the activation,
  residual + LayerNorm, embedding gather + LayerNorm;
- attention lays each (sequence, head)'s keys and values out in panels of 32 and runs blocks of six query rows:
  logits q K^T and the weighted sum of values p V in the same register tiles as the weight products, and the
  masked softmax between them; one parallel task per (sequence, head), or, where FCA's scores need the
  head-averaged rows, per block of rows with the heads in turn, accumulating them on the fly. [B, h, n, n]
  exists only when the caller asks for probabilities;
- FCA's selection and aggregation (`reduce_batch`, for the rules `fca.batchable` accepts) is one
  parallel loop over sequences: rank by a stable sort, copy the fine units, cut the rest into
  chunks, weigh and sum them in float64, add up the sizes. The scores themselves come from the
  statistics the attention loop accumulated (or, for hidden_norm, one NumPy reduction);
- exp (softmax, and the erf/tanh of the activations) is `_exp`, built from float32 arithmetic
  and a bitcast so its loops vectorise: libm's scalar expf/erff made softmax and GELU the
  largest non-GEMM costs (docs/bench_numba.md).

Non-finite input (a NaN or inf that reaches a kernel) gives NaN or inf out, never an exception from
inside a compiled loop: every kernel is compiled with NumPy's error model (`_jit`), so a softmax row
whose sum is 0 or NaN divides as NumPy would instead of raising ZeroDivisionError.

Fastmath only inside `_softmax_row` (the max and the sum may be reassociated, so they vectorise;
softmax several times cheaper), in the LayerNorm loops (reassociation only: their float64 sums vectorise;
benchmarks/ab_ln_sums.py) and FMA contraction in attention (`_panel_tile` fuses its multiply-adds
explicitly); every row is still computed by one thread in
a fixed order by the same compiled code, so the same input gives bit-identical output run to run,
whatever the scheduling.

Threads: the encoder runs on Numba's pool only. It is TBB where the `tbb` wheel is installed
(`minifca/_process.py` says why: no OpenMP runtime of torch's can take it over); on GNU OpenMP, threads that
spin after a parallel loop would starve the next one's partner, so idle OpenMP threads are asked to sleep there.
OpenBLAS (the pooler, the heads, the numpy backend) keeps its own pool; `_process.py` shortens its idle spinning
(OPENBLAS_THREAD_TIMEOUT, read when NumPy loads).
"""
from __future__ import annotations

import contextlib
import math
import threading
import weakref
from dataclasses import dataclass

import numba as nb
import numpy as np
from llvmlite import ir as llvm_ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from .. import fca, reference
from ..errors import ConfigError
from . import aggregate_code

F32 = np.float32
_ACT_KERNELS = {reference.gelu: 0, reference.gelu_new: 1, reference.relu: 2, reference.silu: 3}  # _act_rows' codes
ACT_CODES = {name: _ACT_KERNELS[fn] for name, fn in reference.ACTIVATIONS.items()}
_jit = {"cache": True, "nogil": True, "error_model": "numpy"}  # x / 0 gives inf or NaN, as NumPy's: no ZeroDivisionError
_SUMS = {"reassoc"}  # LayerNorm's float64 sums may be reassociated, so they vectorise (see _ln_row)

# ---------------------------------------------------------------- row helpers (inlined into the loops below)


@nb.njit(inline="always", **_jit)
def _ln_row(row, g, b, eps, out):
    """out = (row - mean) / sqrt(var + eps) * g + b, statistics accumulated in float64 (callers compile
    it with reassociation, _SUMS: the sums then run in vector lanes, in a fixed order all the same)."""
    H = row.shape[0]
    s = 0.0
    for c in range(H):
        s += row[c]
    mu = s / H
    v = 0.0
    for c in range(H):
        t = row[c] - mu
        v += t * t
    mu32 = np.float32(mu)
    sd = np.float32(math.sqrt(np.float32(v / H) + eps))
    for c in range(H):
        out[c] = (row[c] - mu32) / sd * g[c] + b[c]                  # divide, as the reference does


@intrinsic
def _f32_from_bits(typingctx, bits):
    """The float32 whose IEEE-754 bits are the int32 `bits` (a bitcast: one instruction, vectorisable)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvm_ir.FloatType())
    return types.float32(types.int32), codegen


@nb.njit(inline="always", **_jit)
def _exp(x):
    """exp(x) in float32 from +, *, floor, min/max and a bitcast only, so LLVM vectorises the loops that call it
    (libm's expf is a scalar call; there is no SVML here). exp(x) = 2^k e^r with k = round(x / ln 2),
    r = x - k ln 2 (Cody-Waite split), e^r by Cephes' polynomial, 2^k built from its IEEE-754 bits.
    Max relative error 8e-8 against float64 (libm's: 6e-8); 0 below -87, exp(88) above 88."""
    v = min(max(x, np.float32(-87.0)), np.float32(88.0))
    k = np.floor(v * np.float32(1.4426950408889634) + np.float32(0.5))   # float32
    r = v - k * np.float32(0.693359375) + k * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    e = (p * r * r + r) + np.float32(1.0)                           # e^r, |r| <= ln(2) / 2
    y = e * _f32_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))  # * 2^k, k in [-126, 127]
    return y if x > np.float32(-87.0) else np.float32(0.0)          # masked logits give exactly 0


@nb.njit(inline="always", **_jit)
def _erf(x):
    """reference.erf (Abramowitz & Stegun 7.1.26), with the vectorisable _exp."""
    a = abs(x)
    t = np.float32(1.0) / (np.float32(1.0) + np.float32(0.3275911) * a)
    y = t * (np.float32(0.254829592) + t * (np.float32(-0.284496736) + t * (np.float32(1.421413741) + t * (
        np.float32(-1.453152027) + t * np.float32(1.061405429)))))
    e = np.float32(1.0) - y * _exp(-a * a)
    return e if x >= 0 else -e


@nb.njit(inline="always", **_jit)
def _tanh(z):
    e = _exp(np.float32(-2.0) * abs(z))                              # in (0, 1]: no overflow
    t = (np.float32(1.0) - e) / (np.float32(1.0) + e)
    return t if z >= 0 else -t


@nb.njit(inline="always", **_jit)
def _gelu(x):                                                        # exact GELU, x * Phi(x)
    return np.float32(0.5) * x * (np.float32(1.0) + _erf(x * np.float32(0.7071067811865476)))


@nb.njit(inline="always", **_jit)
def _gelu_new(x):                                                    # tanh approximation
    return np.float32(0.5) * x * (np.float32(1.0) + _tanh(
        np.float32(0.7978845608028654) * (x + np.float32(0.044715) * x * x * x)))


@nb.njit(inline="always", **_jit)
def _silu(x):
    return x / (np.float32(1.0) + _exp(-x))


@nb.njit(**_jit)
def _exp_array(x):                                                   # for tests: _exp over an array
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = _exp(x[i])
    return out


@nb.njit(**_jit)
def _erf_array(x):                                                   # for tests: _erf over an array
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = _erf(x[i])
    return out


# ---------------------------------------------------------------- row kernels


@nb.njit(parallel=True, fastmath=_SUMS, **_jit)
def _layer_norm_rows(x, g, b, eps, out):                              # [R, H] -> [R, H]
    for r in nb.prange(x.shape[0]):
        _ln_row(x[r], g, b, eps, out[r])


@nb.njit(parallel=True, fastmath=_SUMS, **_jit)
def _add_layer_norm_rows(x, residual, g, b, eps, out):              # [R, H] + [R, H] -> [R, H]
    H = x.shape[1]
    for r in nb.prange(x.shape[0]):
        tmp = np.empty(H, np.float32)
        for c in range(H):
            tmp[c] = x[r, c] + residual[r, c]
        _ln_row(tmp, g, b, eps, out[r])


@nb.njit(parallel=True, fastmath=_SUMS, **_jit)
def _embed_rows(ids, tt, word, position, token_type, g, b, eps, out):  # [B, L] -> [B, L, H]
    B, L = ids.shape
    H = word.shape[1]
    for r in nb.prange(B * L):
        i, t = r // L, r % L
        w, p, y = word[ids[i, t]], position[t], token_type[tt[i, t]]
        tmp = np.empty(H, np.float32)
        for c in range(H):
            tmp[c] = w[c] + p[c] + y[c]
        _ln_row(tmp, g, b, eps, out[i, t])


@nb.njit(parallel=True, **_jit)
def _act_rows(x, out, code):                                         # [R, I] -> [R, I]; out may be x (in place)
    for r in nb.prange(x.shape[0]):                                  # one branch per row, so the
        if code == 0:                                                # inner loops vectorise
            for c in range(x.shape[1]):
                out[r, c] = _gelu(x[r, c])
        elif code == 1:
            for c in range(x.shape[1]):
                out[r, c] = _gelu_new(x[r, c])
        elif code == 2:
            for c in range(x.shape[1]):
                out[r, c] = max(x[r, c], np.float32(0.0))
        else:
            for c in range(x.shape[1]):
                out[r, c] = _silu(x[r, c])


# ---------------------------------------------------------------- attention


@intrinsic
def _max_vectors(typingctx, s, n_vec):
    """The largest of s[:LANES n_vec] (1-D C-contiguous float32), LANES at a time: a vector of running maxima (a
    compare and a select per step: one vmaxps), then halved four times. LLVM does not vectorise the scalar loop
    `mx = max(mx, s[j])` (a chain of one compare per element, the costliest of the row's passes at 128 keys;
    benchmarks/ab_attention_tiles.py). A NaN is passed over, as that loop passes it; max is exact, so the order
    does not change the result."""
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        i32, vec = llvm_ir.IntType(32), llvm_ir.VectorType(llvm_ir.FloatType(), LANES)
        acc = cgutils.alloca_once_value(builder, llvm_ir.Constant(vec, [float("-inf")] * LANES))
        base = builder.bitcast(data, vec.as_pointer())

        def larger(a, b):
            return builder.select(builder.fcmp_ordered(">", a, b), a, b)
        with cgutils.for_range(builder, args[1]) as loop:
            v = builder.load(builder.gep(base, [loop.index]))
            v.align = 4
            builder.store(larger(v, builder.load(acc)), acc)
        a, w = builder.load(acc), LANES // 2
        while w:                                                     # lane i against lane i + w
            turned = builder.shuffle_vector(a, llvm_ir.Constant(vec, llvm_ir.Undefined), llvm_ir.Constant(
                llvm_ir.VectorType(i32, LANES), [(i + w) % LANES for i in range(LANES)]))
            a, w = larger(turned, a), w // 2
        return builder.extract_element(a, llvm_ir.Constant(i32, 0))
    return types.float32(s, n_vec), codegen


@nb.njit(inline="always", **_jit)
def _row_max(s):                                                     # [n] -> its largest value (NaN passed over)
    mx = _max_vectors(s, s.shape[0] // LANES)                        # whole vectors, then the rest
    for j in range(s.shape[0] // LANES * LANES, s.shape[0]):
        mx = max(mx, s[j])
    return mx


@nb.njit(fastmath={"reassoc", "nsz", "nnan", "contract"}, **_jit)
def _softmax_row(s, bias_b, scale):                                  # [n] logits -> probabilities, in place
    n = s.shape[0]
    for j in range(n):
        s[j] = s[j] / scale + bias_b[j]
    mx = _row_max(s)
    for j in range(n):
        s[j] = _exp(s[j] - mx)
    tot = np.float32(0.0)
    for j in range(n):
        tot += s[j]
    for j in range(n):
        s[j] = s[j] / tot


BLOCK_ROWS = 6   # query rows per block of _attend: one register tile of `_panel_tile` (TILE_ROWS, below)


@nb.njit(inline="always", **_jit)
def _key_offsets(start, n_head, d):
    """[B + 1] where each sequence's key panels begin in _attend's flat key buffer: n_head heads of
    ceil(m / 32) panels of [d, 32] floats each (a sequence's m keys, zero-padded to whole panels)."""
    B = start.shape[0] - 1
    off = np.zeros(B + 1, np.int64)
    for b_ in range(B):
        off[b_ + 1] = off[b_] + n_head * ((start[b_ + 1] - start[b_] + PANEL - 1) // PANEL) * d * PANEL
    return off


@nb.njit(inline="always", **_jit)
def _key_panel(Kp, koff, b_, h, p, m, d):
    """Panel p of head h's keys of sequence b_, [d, 32]: Kp[..][c, jj] = key 32 p + jj's element c (0 past m)."""
    o = koff[b_] + ((h * ((m + PANEL - 1) // PANEL)) + p) * d * PANEL
    return Kp[o:o + d * PANEL].reshape((d, PANEL))


@nb.njit(inline="always", **_jit)
def _value_panel(Vp, base, h, g, m, n_head, n_vp):
    """Panel g of head h's values of the sequence at rows base..base+m, [m, 32] (as `_panel_tile` reads a weight
    panel): row j holds value j's elements 32 g.. of the head (0 past d). A sequence's panels start at
    base n_head n_vp 32 floats of _attend's flat value buffer, head after head."""
    o = (base * n_head + h * m) * n_vp * PANEL + g * m * PANEL
    return Vp[o:o + m * PANEL].reshape((m, PANEL))


@nb.njit(inline="always", **_jit)
def _lay_out_head(K, V, start, b_, h, d, Kp, koff, Vp, n_head, n_vp):
    """Sequence b_'s keys and values of head h as `_attend` reads them: key panels [d, 32] (`_key_panel`) and
    value panels [m, 32] (`_value_panel`), zero past the sequence's m keys and past the head's d elements."""
    base, m = start[b_], start[b_ + 1] - start[b_]
    for p in range((m + PANEL - 1) // PANEL):
        kp = _key_panel(Kp, koff, b_, h, p, m, d)
        for jj in range(PANEL):                                      # key by key: K's rows read in order
            j = p * PANEL + jj
            for c in range(d):
                kp[c, jj] = K[base + j, h * d + c] if j < m else np.float32(0.0)
    for g in range(n_vp):
        vp = _value_panel(Vp, base, h, g, m, n_head, n_vp)
        for j in range(m):
            for cc in range(PANEL):
                c = g * PANEL + cc
                vp[j, cc] = V[base + j, h * d + c] if c < d else np.float32(0.0)


@nb.njit(inline="always", fastmath={"contract"}, **_jit)
def _attend_block(Q, bias, start, b_, i0, h, d, Kp, koff, Vp, n_head, n_vp, scale, zero, want_probs, probs, s, os,
                  ctx):
    """Head h of the block of query rows i0.. (at most BLOCK_ROWS) of sequence b_: its logits q K_h^T into s, 32
    keys per tile, the masked softmax of each row (probabilities left in s[:rows, :m], and in probs if
    want_probs), then its context p V_h, 32 elements per tile, into ctx."""
    base, m = start[b_], start[b_ + 1] - start[b_]                   # the sequence's first row, its units
    q0r, rows = base + i0, min(BLOCK_ROWS, m - i0)                   # the block's first row in Q and ctx
    q = Q[:, h * d:(h + 1) * d]                                      # head h's queries (strided rows)
    for p in range((m + PANEL - 1) // PANEL):                        # s = q K_h^T, 32 keys per tile
        _tile(rows, q, q0r, _key_panel(Kp, koff, b_, h, p, m, d), zero, 0, s, 0, p * PANEL)
    bias_b = bias[base:base + m]
    for r in range(rows):
        _softmax_row(s[r, :m], bias_b, scale)
        if want_probs:
            probs[b_, h, i0 + r, :m] = s[r, :m]
    for g in range(n_vp):                                            # ctx = p V_h, 32 elements per tile
        vp, c0 = _value_panel(Vp, base, h, g, m, n_head, n_vp), h * d + g * PANEL
        if g * PANEL + PANEL <= d:                                   # a whole panel: straight into ctx
            _tile(rows, s[:, :m], 0, vp, zero, 0, ctx, q0r, c0)
        else:                                                        # the head's last elements, via scratch
            _tile(rows, s[:, :m], 0, vp, zero, 0, os, 0, 0)
            for r in range(rows):
                ctx[q0r + r, c0:h * d + d] = os[r, :d - g * PANEL]


@nb.njit(parallel=True, fastmath={"contract"}, **_jit)
def _attend(Q, K, V, bias, start, blk_seq, blk_row, n_head, want_probs, want_stats, probs, abar, ctx):
    """Masked multi-head attention of every query row, sequence by sequence; Q, K, V [T, H] (biases added).

    Sequence b is rows start[b]:start[b + 1] of Q, K and V (a padded [B, n, H] batch: start[b] = b n; a
    `Packed` one: its valid units only); bias [T] is added to the logits of each key (NEG for padding,
    log(size) for proportional attention). Query rows go six at a time, in blocks (`_attend_block`); block t
    is rows blk_row[t].. of sequence blk_seq[t]. Writes ctx [T, H]; probs [B, h, n, n] if want_probs; abar
    [B, n, n] (head mean) if want_stats (entries outside each sequence's m x m block left as the caller made
    them).

    Both products are the weight products' register tile (`_panel_tile`, below), with each (sequence, head)'s
    keys and values laid out first as panels of 32 (`_lay_out_head`: keys [d, 32] per 32 keys; values [m, 32]
    per 32 of the head's d elements; zero-padded): the logits of a block are q K_h^T, its six rows by 32 keys
    per tile, in c order; after the masked softmax of each row, its context is p V_h, six rows by 32 elements
    per tile, in key order. A sequence's last block takes tiles of as many rows as it has left (`_tile`).
    Without statistics, one parallel task per (sequence, head) lays its panels out and runs its blocks (its
    panels still in cache); with them, every head's panels come first, then one task per block runs the heads
    in order, summing the probabilities for the head mean as it goes.
    Each row's arithmetic is the same, in the same order, whichever block or task it falls in.
    """
    T, H = Q.shape
    B = start.shape[0] - 1
    d = H // n_head
    R = BLOCK_ROWS                                                   # query rows per block
    n_vp = (d + PANEL - 1) // PANEL                                  # value panels per head
    scale = np.float32(math.sqrt(d))
    koff = _key_offsets(start, n_head, d)
    Kp = np.empty(koff[B], np.float32)                               # per sequence, head: key panels [d, 32]
    Vp = np.empty(T * n_head * n_vp * PANEL, np.float32)             # per sequence, head: value panels [m, 32]
    zero = np.zeros(PANEL, np.float32)                               # the tiles' "bias": sums start at 0
    if not want_stats:
        for bh in nb.prange(B * n_head):
            b_, h = bh // n_head, bh % n_head
            m = start[b_ + 1] - start[b_]
            _lay_out_head(K, V, start, b_, h, d, Kp, koff, Vp, n_head, n_vp)
            s = np.zeros((R, (m + PANEL - 1) // PANEL * PANEL), np.float32)  # a block's logits, probabilities
            os = np.empty((R, PANEL), np.float32)                    # one tile of context
            for i0 in range(0, m, R):
                _attend_block(Q, bias, start, b_, i0, h, d, Kp, koff, Vp, n_head, n_vp, scale, zero, want_probs,
                              probs, s, os, ctx)
        return
    for bh in nb.prange(B * n_head):
        _lay_out_head(K, V, start, bh // n_head, bh % n_head, d, Kp, koff, Vp, n_head, n_vp)
    for t in nb.prange(blk_seq.shape[0]):
        b_, i0 = blk_seq[t], blk_row[t]
        m = start[b_ + 1] - start[b_]
        rows = min(R, m - i0)
        s = np.zeros((R, (m + PANEL - 1) // PANEL * PANEL), np.float32)
        os = np.empty((R, PANEL), np.float32)
        acc = np.zeros((R, m), np.float32)                           # head sum of the probabilities
        for h in range(n_head):
            _attend_block(Q, bias, start, b_, i0, h, d, Kp, koff, Vp, n_head, n_vp, scale, zero, want_probs, probs,
                          s, os, ctx)
            for r in range(rows):
                for j in range(m):
                    acc[r, j] += s[r, j]
        for r in range(rows):
            for j in range(m):
                abar[b_, i0 + r, j] = acc[r, j] / np.float32(n_head)


@nb.njit(**_jit)
def _blocks(start):
    """The blocks of BLOCK_ROWS query rows `_attend` runs in parallel: [nblk] the sequence of each, its first row
    in it (compiled: it runs once per layer, and NumPy's calls on [B] arrays cost more than the loop)."""
    B = len(start) - 1
    n_blk = 0
    for b_ in range(B):
        n_blk += (start[b_ + 1] - start[b_] + BLOCK_ROWS - 1) // BLOCK_ROWS
    seq, row = np.empty(n_blk, np.int64), np.empty(n_blk, np.int64)
    t = 0
    for b_ in range(B):
        for r in range(0, start[b_ + 1] - start[b_], BLOCK_ROWS):
            seq[t], row[t] = b_, r
            t += 1
    return seq, row


@nb.njit(parallel=True, **_jit)
def _head_mean(probs, out):                                          # [B, h, n, n] -> [B, n, n]
    B, h, n, _ = probs.shape
    for r in nb.prange(B * n):
        b_, i = r // n, r % n
        for j in range(n):
            t = np.float32(0.0)
            for k in range(h):
                t += probs[b_, k, i, j]
            out[b_, i, j] = t / np.float32(h)


@nb.njit(parallel=True, **_jit)
def _stats_from_abar(abar, valid, received, cls, entropy):
    """FCA statistics of the head-averaged attention abar [B, n, n]; see reference.attention_stats.

    Column sums one task per sequence, then one task per row of the batch (the entropies' logs are the work: in
    parallel at batch 1 too)."""
    B, n, _ = abar.shape
    rec = np.zeros((B, n), np.float64)
    for b_ in nb.prange(B):
        for i in range(n):
            if valid[b_, i] > 0:
                for j in range(n):
                    rec[b_, j] += abar[b_, i, j]
    for r in nb.prange(B * n):
        b_, j = r // n, r % n
        e = 0.0
        for k in range(n):
            a = abar[b_, j, k]
            e -= a * math.log(max(a, np.float32(1e-30)))
        v = valid[b_, j]
        received[b_, j] = np.float32(rec[b_, j] - abar[b_, j, j]) * v
        cls[b_, j] = abar[b_, 0, j] * v
        entropy[b_, j] = np.float32(e) * v


# ---------------------------------------------------------------- FCA: selection and aggregation

@nb.njit(parallel=True, **_jit)
def _reduce_rows(s, x, sizes, valid, k, c, active, agg, new_x, new_sizes):
    """fca.reduce_batch, one sequence per iteration: rank, copy the fine units, weigh and sum the rest.

    s [B, n] float64, x [B, n, H], sizes [B, n], valid [B, n] bool, k/c [B] int64, active [B] bool,
    agg the rule's `kernels.aggregate_code`; new_x [B, N, H] and new_sizes [B, N] zeroed by the caller.
    """
    B, n, H = x.shape
    for b_ in nb.prange(B):
        fine = valid[b_].copy()                                      # units copied as they are: every valid
        m = 0                                                        # one, unless the sequence shrinks
        if active[b_]:
            first = -1                                               # [CLS]: the first valid unit
            cand = np.empty(n, np.int64)                             # the other valid units, in order
            for j in range(n):
                if valid[b_, j]:
                    if first < 0:
                        first = j
                    else:
                        cand[m] = j
                        m += 1
            neg = np.empty(m, np.float64)
            for t in range(m):
                neg[t] = -s[b_, cand[t]]
            order = np.argsort(neg, kind="mergesort")                # best first, earlier unit on ties
            for t in range(k[b_] - 1, m):
                fine[cand[order[t]]] = False                         # [CLS] + the k-1 best stay
        slot = 0
        for j in range(n):                                           # kept units, in sequence order
            if fine[j]:
                new_x[b_, slot, :] = x[b_, j, :]
                new_sizes[b_, slot] = sizes[b_, j]
                slot += 1
        cb = c[b_]
        if not active[b_] or agg == 0 or cb == 0:                    # drop: U is discarded
            continue
        mu = m - (k[b_] - 1)                                         # |U|
        q, big = mu // cb, mu % cb                                   # chunk length; the first `big` one longer
        group = np.full(n, -1, np.int64)
        r = 0
        for j in range(n):
            if valid[b_, j] and not fine[j]:
                group[j] = r // (q + 1) if r < big * (q + 1) else big + (r - big * (q + 1)) // max(q, 1)
                r += 1
        top = np.full(cb, -np.inf)                                   # per group: max score, total
        tot32 = np.zeros(cb, np.float32)
        tot = np.zeros(cb, np.float64)
        for j in range(n):
            g = group[j]
            if g >= 0:
                top[g] = max(top[g], s[b_, j])
                tot32[g] += sizes[b_, j]
        w = np.zeros(n, np.float64)
        for j in range(n):
            g = group[j]
            if g >= 0:
                w[j] = np.float64(sizes[b_, j] / tot32[g]) if agg == 1 else math.exp(s[b_, j] - top[g])
                tot[g] += w[j]
        acc = np.zeros((cb, H), np.float64)                          # coarse units, summed in float64
        for j in range(n):
            g = group[j]
            if g >= 0:
                wj = w[j] if agg == 1 else w[j] / tot[g]             # mean's weights already sum to 1
                for h in range(H):
                    acc[g, h] += wj * x[b_, j, h]
        for g in range(cb):
            for h in range(H):
                new_x[b_, slot + g, h] = acc[g, h]
            new_sizes[b_, slot + g] = tot32[g]


def reduce_batch(s, x, sizes, valid, k, c, active, aggregate):
    """fca.reduce_batch: the same units, order and sizes; coarse sums in float64 as there."""
    B, _n, H = x.shape
    N = int(fca.units_out(valid, k, c, active).max())
    new_x = np.zeros((B, N, H), x.dtype)
    new_sizes = np.zeros((B, N), sizes.dtype)
    _reduce_rows(np.ascontiguousarray(s, np.float64), np.ascontiguousarray(x), np.ascontiguousarray(sizes),
                 np.ascontiguousarray(valid, np.bool_), np.asarray(k, np.int64), np.asarray(c, np.int64),
                 np.asarray(active, np.bool_), aggregate_code(aggregate), new_x, new_sizes)
    return new_x, new_sizes


# ---------------------------------------------------------------- the weight products


LANES = 16                  # floats in one vector register (AVX-512); a panel is PANEL_VECS of them wide
PANEL_VECS = 2
PANEL = LANES * PANEL_VECS  # output columns per panel: 32
TILE_ROWS = 6               # rows of x per register tile: 6 x 2 accumulators of 16 floats
X_BLOCK = 1 << 17           # floats of x per task (512 KiB): its rows stay in L2 while the task's panels pass
TASK_PANELS = 2             # panels per task


def panels(w):
    """w [out, in] laid out for `_linear_rows`: [ceil(out / 32), in, 32], panel p holding the weights of outputs
    32p..32p+31 with k as rows, so the 32 weights one step of the sum needs are 128 contiguous bytes and a
    panel is read front to back. Outputs past `out` (the last panel's padding) have zero weights."""
    out, inp = w.shape
    n = -(-out // PANEL) * PANEL
    wp = np.zeros((n, inp), F32)
    wp[:out] = w
    wp = np.ascontiguousarray(wp.reshape(n // PANEL, PANEL, inp).transpose(0, 2, 1))
    wp.flags.writeable = False
    return wp


def _tile_of(n_rows):
    """The register tile of n_rows rows (an intrinsic): `_panel_tile` is the one of TILE_ROWS rows."""

    @intrinsic
    def tile(typingctx, x, r0, wp, b, n0, out, o0, c0):
        return types.void(x, r0, wp, b, n0, out, o0, c0), _tile_codegen(n_rows)
    return tile


def _tile_ahead_of(n_rows):
    """The same tile, also prefetching K cache lines of the next panel `wn` from its line `line0` on (one per
    step k): `_panel_tile_ahead`, which the first two tiles of each panel run (`_linear_rows`)."""

    @intrinsic
    def tile(typingctx, x, r0, wp, b, n0, out, o0, c0, wn, line0):
        return types.void(x, r0, wp, b, n0, out, o0, c0, wn, line0), _tile_codegen(n_rows, ahead=True)
    return tile


def _tile_codegen(n_rows, ahead=False):
    """out[o0 + i, c0 : c0 + 32] = b[n0 : n0 + 32] + sum over k of x[r0 + i, k] * wp[k, :], for i < n_rows.

    One register tile, written as LLVM vector code (Numba cannot keep 12 vectors in registers across a loop
    otherwise): with 6 rows, 12 accumulators of 16 floats start at the bias; each step k loads the panel's 32
    weights (two vectors) and each row's x[r, k] (broadcast), and does 12 fused multiply-adds. Every output is
    then the bias plus its products added in k order, one FMA each: the same sum wherever the tile sits, and
    whatever its number of rows (the 1-5 row tiles take a block's last rows, with no padding to compute).
    x, out: 2-D C-ordered float32 (x's rows may be strided); wp: one panel [K, 32]; b: the bias, readable to
    n0 + 32.

    ahead: the tile also takes wn (the next panel, C-contiguous [K, 32]: 2K cache lines of 64 bytes) and line0,
    and at step k asks the cache for wn's line line0 + k (`llvm.prefetch`, which never faults and changes no
    result): the arithmetic is the same, only the next panel's reads from memory start while this one computes."""

    def codegen(context, builder, signature, args):
        xa, wa, ba, oa = (context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 2, 3, 5))
        r0v, n0v, o0v, c0v = args[1], args[4], args[6], args[7]
        f32, i32, i64 = llvm_ir.FloatType(), llvm_ir.IntType(32), llvm_ir.IntType(64)
        vec = llvm_ir.VectorType(f32, LANES)
        fma = cgutils.get_or_insert_function(builder.module, llvm_ir.FunctionType(vec, [vec] * 3), "llvm.fma.v16f32")
        K = cgutils.unpack_tuple(builder, xa.shape, 2)[1]
        x_row, w_row, o_row = (cgutils.unpack_tuple(builder, a.strides, 2)[0] for a in (xa, wa, oa))  # bytes

        def at(base, offset_bytes, ty):                              # a typed pointer base + offset bytes
            raw = builder.gep(builder.bitcast(base, llvm_ir.IntType(8).as_pointer()), [offset_bytes])
            return builder.bitcast(raw, ty.as_pointer())

        def load(ptr):
            v = builder.load(ptr)
            v.align = 4
            return v

        def const(v):
            return llvm_ir.Constant(i64, v)
        rows = [builder.mul(builder.add(r0v, const(i)), x_row) for i in range(n_rows)]  # byte offsets in x
        bias = [load(at(ba.data, builder.mul(builder.add(n0v, const(LANES * g)), const(4)), vec))
                for g in range(PANEL_VECS)]
        acc = [[cgutils.alloca_once_value(builder, bias[g]) for g in range(PANEL_VECS)] for _ in range(n_rows)]
        undef = llvm_ir.Constant(vec, llvm_ir.Undefined)
        splat_mask = llvm_ir.Constant(llvm_ir.VectorType(i32, LANES), [0] * LANES)
        if ahead:
            next_panel, line0 = context.make_array(signature.args[8])(context, builder, args[8]).data, args[9]
            i8p = llvm_ir.IntType(8).as_pointer()
            prefetch = cgutils.get_or_insert_function(                # (address, read, keep in all levels, data)
                builder.module, llvm_ir.FunctionType(llvm_ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0")
            hints = [llvm_ir.Constant(i32, v) for v in (0, 3, 1)]
        with cgutils.for_range(builder, K) as loop:                  # allocas: LLVM keeps them in registers
            k = loop.index
            wk = builder.mul(k, w_row)
            if ahead:
                line = at(next_panel, builder.mul(builder.add(line0, k), const(64)), llvm_ir.IntType(8))
                builder.call(prefetch, [line, *hints])
            w = [load(at(wa.data, builder.add(wk, const(4 * LANES * g)), vec)) for g in range(PANEL_VECS)]
            for i in range(n_rows):
                xik = builder.load(at(xa.data, builder.add(rows[i], builder.mul(k, const(4))), f32))
                xv = builder.shuffle_vector(builder.insert_element(undef, xik, llvm_ir.Constant(i32, 0)), undef,
                                            splat_mask)
                for g in range(PANEL_VECS):
                    builder.store(builder.call(fma, [xv, w[g], builder.load(acc[i][g])]), acc[i][g])
        for i in range(n_rows):
            row = builder.add(builder.mul(builder.add(o0v, const(i)), o_row), builder.mul(c0v, const(4)))
            for g in range(PANEL_VECS):
                st = builder.store(builder.load(acc[i][g]), at(oa.data, builder.add(row, const(4 * LANES * g)), vec))
                st.align = 4
        return context.get_dummy_value()
    return codegen


_panel_tile = _tile_of(TILE_ROWS)
_panel_tile_ahead = _tile_ahead_of(TILE_ROWS)
_tile1, _tile2, _tile3, _tile4, _tile5 = (_tile_of(n) for n in range(1, TILE_ROWS))


@nb.njit(inline="always", **_jit)
def _tile(n, x, r0, wp, b, n0, out, o0, c0):
    """The register tile of n <= TILE_ROWS rows: `_panel_tile`, or for a block's last 1-5 rows one of as many."""
    if n == TILE_ROWS:
        _panel_tile(x, r0, wp, b, n0, out, o0, c0)
    elif n == 1:
        _tile1(x, r0, wp, b, n0, out, o0, c0)
    elif n == 2:
        _tile2(x, r0, wp, b, n0, out, o0, c0)
    elif n == 3:
        _tile3(x, r0, wp, b, n0, out, o0, c0)
    elif n == 4:
        _tile4(x, r0, wp, b, n0, out, o0, c0)
    else:
        _tile5(x, r0, wp, b, n0, out, o0, c0)


@nb.njit(parallel=True, **_jit)
def _linear_rows(x, wp, b, out):                                     # [R, in] @ [out, in]^T + [out] -> [R, out]
    """x @ w^T + b with w laid out by `panels` (wp [P, in, 32]); b padded to 32 P; out [R, N], N <= 32 P.

    One parallel loop over tasks (a block of x's rows by TASK_PANELS panels), each a run of `_panel_tile`s;
    rows past the block's last full tile take a tile of as many rows (`_tile`), and a last panel wider than out
    goes through scratch. So every output element is the same sum in the same order whatever the number of
    rows, the row's place among them or the thread count: a sentence's vectors do not depend on what it was
    batched with.

    The first two tiles of a panel prefetch the next panel (`_panel_tile_ahead`), also across the task's end
    (TBB runs a thread's share of the tasks in order). Every forward reads the weights from memory again
    (MiniLM's 42 MB and bert-base's 340 MB are more than the L3), and at batch 1 or after FCA the few rows leave
    too little arithmetic per panel to hide those reads otherwise (benchmarks/ab_linear_before.py,
    benchmarks/products_ceiling.py)."""
    R, K = x.shape
    P, N = wp.shape[0], out.shape[1]
    most = max(TILE_ROWS, min(240, X_BLOCK // max(K, 1)))           # x's rows per task, at most
    n_rb = max(1, (R + most - 1) // most)
    each = (R + n_rb - 1) // n_rb                                    # row blocks of equal size (the threads'
    rows = max(TILE_ROWS, (each + TILE_ROWS - 1) // TILE_ROWS * TILE_ROWS)  # shares even), whole tiles
    n_rb, n_pb = (R + rows - 1) // rows, (P + TASK_PANELS - 1) // TASK_PANELS
    for t in nb.prange(n_rb * n_pb):
        r_lo, p_lo = (t // n_pb) * rows, (t % n_pb) * TASK_PANELS
        r_hi, p_hi = min(r_lo + rows, R), min(p_lo + TASK_PANELS, P)
        r_full = r_lo + (r_hi - r_lo) // TILE_ROWS * TILE_ROWS       # rows in full tiles end here
        os = np.empty((TILE_ROWS, PANEL), np.float32)                # a scratch tile's sums
        for p in range(p_lo, p_hi):
            n0, width = p * PANEL, min(PANEL, N - p * PANEL)
            if width == PANEL:                                       # (the full tiles' loop on its own: hot)
                for r in range(r_lo, r_full, TILE_ROWS):
                    i = (r - r_lo) // TILE_ROWS                      # tiles 0 and 1: lines [0, K), [K, 2K)
                    if i < 2 and p + 1 < P:
                        _panel_tile_ahead(x, r, wp[p], b, n0, out, r, n0, wp[p + 1], i * K)
                    else:
                        _panel_tile(x, r, wp[p], b, n0, out, r, n0)
                if r_full < r_hi:
                    _tile(r_hi - r_full, x, r_full, wp[p], b, n0, out, r_full, n0)
            else:                                                    # the last panel is wider than out
                for r in range(r_lo, r_hi, TILE_ROWS):
                    n = min(TILE_ROWS, r_hi - r)
                    _tile(n, x, r, wp[p], b, n0, os, 0, 0)
                    out[r:r + n, n0:] = os[:n, :width]


_PANELS = {}                # id(w) -> (weak reference to w, panels(w)) for read-only weights: laid out once


def _laid_out(w):
    """panels(w), kept while w lives for a read-only weight (a model's, memory-mapped: it cannot change under the
    copy); a writeable array is laid out afresh on every call, so an update to it is never missed."""
    if w.flags.writeable:
        return panels(w)
    hit = _PANELS.get(id(w))
    if hit is None or hit[0]() is not w:
        hit = _PANELS[id(w)] = (weakref.ref(w), panels(w))
        weakref.finalize(w, _PANELS.pop, id(w), None)                # the panels go when the weight goes
    return hit[1]


def lay_out(params, after_each_layer=None):
    """Lay the encoder layers' linear weights out for `_linear_rows` once, at load (`panels`, kept beside the
    weights, which stay as they are, [out, in], memory-mapped unless loaded with mmap=False, for every other
    reader; read-only, so the panels cannot fall behind them). `after_each_layer(layer)`
    runs once each layer is laid out (from_pretrained unmaps the pages its copy read: weights.release_pages), so
    resident memory holds the layer weights once, also while loading."""
    for layer in params["layers"]:
        for p in [*(layer["attn"][k] for k in "qkvo"), layer["ffn"]["i"], layer["ffn"]["o"]]:
            p["w"].flags.writeable = False                           # the model's own (read into memory with
            _laid_out(p["w"])                                        # mmap=False, or converted): frozen
        if after_each_layer is not None:
            after_each_layer(layer)


def linear(x, w, b):
    """reference.linear ([..., in] -> [..., out]) in `_linear_rows`: the heads' products, so that a numba forward
    never wakes OpenBLAS's threads (whose idle spinning would take the cores from the next forward's kernels)."""
    x = np.asarray(x)
    return _linear(x.reshape(-1, x.shape[-1]), w, b).reshape(*x.shape[:-1], w.shape[0])


def _linear(x2, w, b):
    """[R, in] @ [out, in]^T + b, C-contiguous [R, out]: reference.linear's product in `_linear_rows`."""
    wp = _laid_out(w)
    bias = np.ascontiguousarray(b, F32)                              # the tiles read it panel-wide: padded only
    if len(bias) % PANEL:                                            # where out is not a multiple of 32
        bias = np.concatenate([bias, np.zeros(wp.shape[0] * PANEL - len(bias), F32)])
    out = np.empty((x2.shape[0], w.shape[0]), F32)
    _linear_rows(np.ascontiguousarray(x2, F32), wp, bias, out)
    return out


# ---------------------------------------------------------------- padding-free execution


@dataclass(frozen=True)
class Packed:
    """A batch's valid units only, as rows, sequence after sequence: sequence b is rows[start[b]:start[b + 1]].

    The numba backend's activation between `pack` and `to_host` (padding-free execution): the linear layers,
    LayerNorm and the FFN run on the T valid rows alone, attention runs per sequence, and nothing is computed
    for padding. `to_host` gives the padded [B, n, H] batch back, zeros at padding. Every op below takes
    either kind and gives back the kind it was given.
    """
    rows: np.ndarray                                                 # [T, H] C-contiguous
    start: np.ndarray                                                # [B + 1] int64
    n: int                                                           # the batch's padded length

    @property
    def valid(self):                                                 # [B, n] bool
        return np.arange(self.n)[None] < np.diff(self.start)[:, None]


def pack(x, mask):
    """The valid rows of x [B, n, H] (a `Packed`) when every sequence's valid units come first (right padding:
    what the tokenizer and FCA's reductions make); any other mask (left padding, holes) keeps the padded batch,
    computed as the reference computes it."""
    if isinstance(x, Packed):
        return x
    valid = np.asarray(mask) > 0                                     # [B, n]
    B, n, _ = x.shape
    lens = valid.sum(1)                                              # [B]
    if not np.array_equal(valid, np.arange(n)[None] < lens[:, None]):
        return x
    start = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)  # [B + 1]
    rows = _rows(x) if start[-1] == B * n else np.ascontiguousarray(x[valid], F32)  # [T, H]
    return Packed(rows, start, n)


def to_host(a):
    """An activation as a NumPy array: a `Packed` batch padded back to [B, n, H] (zeros at padding)."""
    if not isinstance(a, Packed):
        return a
    B, H = len(a.start) - 1, a.rows.shape[1]
    if a.start[-1] == B * a.n:
        return a.rows.reshape(B, a.n, H)
    out = np.zeros((B, a.n, H), a.rows.dtype)
    out[a.valid] = a.rows
    return out


def _rows(x):
    """x's rows, [R, H] C-contiguous: a `Packed` batch's valid rows, or every row of an array."""
    if isinstance(x, Packed):
        return x.rows
    return np.ascontiguousarray(x, dtype=F32).reshape(-1, x.shape[-1])


def _like(x, rows):
    """rows [R, H'] in x's layout: a `Packed` like x, or x's batch shape."""
    if isinstance(x, Packed):
        return Packed(rows, x.start, x.n)
    return rows.reshape(x.shape[:-1] + rows.shape[-1:])


# ---------------------------------------------------------------- the functions of reference.py


def layer_norm(x, g, b, eps):
    out = np.empty(x.shape, F32)
    _layer_norm_rows(_rows(x), g, b, F32(eps), out.reshape(-1, x.shape[-1]))
    return out                                                       # [..., H]


def add_layer_norm(x, residual, g, b, eps):
    x2 = _rows(x)                                                    # [R, H]
    out = np.empty(x2.shape, F32)
    _add_layer_norm_rows(x2, _rows(residual), g, b, F32(eps), out)
    return _like(x, out)                                             # [B, n, H] or Packed


def embeddings(ids, tt, word, position, token_type, ln, eps):
    ids, tt = np.ascontiguousarray(ids, np.int64), np.ascontiguousarray(tt, np.int64)
    out = np.empty(ids.shape + (word.shape[1],), F32)                # [B, L, H]
    _embed_rows(ids, tt, word, position, token_type, ln["g"], ln["b"], F32(eps), out)
    return out


def ffn(x, i, o, act):
    if act not in ACT_CODES:
        raise ConfigError(f"config.json hidden_act {act!r} is not supported; choose from {', '.join(ACT_CODES)}")
    x2 = _rows(x)                                                    # [R, H]
    hid = _linear(x2, **i)                                           # [R, I]
    _act_rows(hid, hid, ACT_CODES[act])                              # [R, I] in place
    return _like(x, _linear(hid, **o))                               # [B, n, H] or Packed


def attention_stats(probs, mask):
    """reference.attention_stats from full probabilities [B, h, n, n]."""
    B, _, n, _ = probs.shape
    abar = np.empty((B, n, n), F32)
    _head_mean(np.ascontiguousarray(probs, F32), abar)               # [B, n, n]
    return _stats(abar, mask)


def _stats(abar, mask):
    B, n, _ = abar.shape
    valid = (np.asarray(mask) > 0).astype(F32)                       # [B, n]
    received, cls, entropy = (np.empty((B, n), F32) for _ in range(3))
    _stats_from_abar(abar, valid, received, cls, entropy)
    return {"received": received, "cls": cls, "entropy": entropy}


def attention(x, mask, log_size, q, k, v, o, n_head, want_probs=True, want_stats=False):
    """reference.attention; probabilities only when want_probs, FCA statistics only when want_stats.

    On a `Packed` batch, only the valid units: probabilities and statistics are 0 at padding (the reference's
    padded query rows attend the valid keys; nothing reads them)."""
    mask = np.asarray(mask)
    B, n = mask.shape
    x2 = _rows(x)                                                    # [T, H]
    Q, K, V = (_linear(x2, **p) for p in (q, k, v))                  # [T, H]
    if isinstance(x, Packed):                                        # every row valid: no mask to add
        start = x.start
        bias = np.zeros(len(x2), F32) if log_size is None else np.asarray(log_size, F32)[x.valid]  # [T]
    else:
        start = np.arange(B + 1, dtype=np.int64) * n
        bias = np.where(mask > 0, F32(0), reference.NEG)             # [B, n]
        if log_size is not None:
            bias = bias + log_size
        bias = bias.reshape(-1)                                      # [T = B n]
    bias = np.ascontiguousarray(bias, F32)
    probs = np.zeros((B, n_head, n, n) if want_probs else (1, 1, 1, 1), F32)
    abar = np.zeros((B, n, n) if want_stats else (1, 1, 1), F32)
    ctx = np.empty(x2.shape, F32)                                    # [T, H]
    _attend(Q, K, V, bias, start, *_blocks(start), n_head, bool(want_probs), bool(want_stats), probs, abar, ctx)
    stats = _stats(abar, mask) if want_stats else None               # {name: [B, n]}
    out = _linear(ctx, **o)                                          # [T, H]
    return _like(x, out), probs if want_probs else None, stats, _like(x, K)


def reduce(state, layer, cfg, x, mask, sizes, stats, keys):
    """reference.reduce, its batched layers by this module's compiled `reduce_batch`; a `Packed` batch
    leaves packed again."""
    new_x, new_mask, new_sizes = state.reduce(layer, cfg, to_host(x), mask, sizes, stats, to_host(keys),
                                              reduce_batch)
    return (pack(new_x, new_mask) if isinstance(x, Packed) else new_x), new_mask, new_sizes


log_size, resident_params = reference.log_size, reference.resident_params  # host arrays



_GUARD = None
_GUARD_INIT = threading.Lock()


def one_at_a_time():
    """A lock around each forward where Numba's threading layer is `workqueue`, else nothing.

    Numba picks its layer when its pool first starts: OpenMP (or TBB) where the runtime is installed,
    else workqueue, which aborts the whole process ("Concurrent access has been detected") when two
    Python threads run parallel=True functions at once. There, forwards from several threads take
    turns; with OpenMP/TBB they run concurrently. The pool is started here (one tiny kernel) to learn
    which layer it is, under a lock so two first calls cannot race.
    """
    global _GUARD
    if _GUARD is None:
        with _GUARD_INIT:
            if _GUARD is None:
                one = np.ones((1, 1), F32)
                _layer_norm_rows(one, one[0], one[0], F32(1e-5), np.empty_like(one))  # starts Numba's pool
                _GUARD = threading.Lock() if nb.threading_layer() == "workqueue" else contextlib.nullcontext()
    return _GUARD
