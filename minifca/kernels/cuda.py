"""backend="cuda": the reference's compute functions (and FCA) as numba.cuda kernels, the batch kept on the GPU.

`CudaOps` provides the ops contract (kernels/__init__.py) that `reference.bert_forward`, the one layer
loop, runs on: on host arrays each op gives host arrays back, so each is tested against the reference;
on the device arrays of `resident_params` (the weights, uploaded once per model) and of its own
outputs it gives device arrays back, so a forward keeps the batch on the device between layers and
copies back only what the loop hands `to_host`. Each kernel stands for a reference function
(`minifca.reference`, `minifca.fca`):

    kernel            reference                       one block per
    matmul_bias_act   linear (+ activation of ffn)    BM x BN output tile, shared-memory tiles of A and W
    embed_gather      embeddings' word + pos + type   token
    add_ln            add_layer_norm / layer_norm     row
    attention         attention's softmax(QK^T/sqrt d + bias) V   (query, head, batch); probs [B, h, n, n]
                                                      written when asked for (output_attentions)
    attention_abar    the same at an FCA layer        (query, batch): the heads in turn, summing the
                      when no probs are asked for     head-averaged row Abar[b, i, :] in shared memory
                                                      (one thread per key: fixed order, no atomics);
                                                      writes Abar [B, n, n], never [B, h, n, n]
    head_mean         probs.mean(1): Abar from probs  thread per (batch, query, key)
    stats             attention_stats, from Abar      thread per (batch, unit)
    fca_norms         fca.hidden_norm (float64)       row
    fca_select        fca.reduce_batch's decisions    sequence: [CLS] + the k-1 best (ranks by counting),
                                                      groups, weights, sizes, log sizes -> a gather plan
    merge             fca.merge, reduce_batch's sums  output unit: copies and float64 weighted sums

Both attention kernels call one device function, `attend_head` (a query row of one head: q load,
masked logits plus the optional log-size bias, softmax, p V), so the attention is written once.
At an FCA layer the statistics come from `attention_abar` + `stats`; only when the probabilities
are wanted too does `attention` write them and `head_mean` average them for `stats`.

FCA with rules registered as batched (`fca.batchable`: the built-in attention_received, cls_attention,
attention_entropy, hidden_norm x drop, mean, weighted, clusters, and any rule registered with
batched=True) runs on the device (`CudaOps.reduce`): the host only counts, from the mask, how many
units each sequence keeps and makes (`fca.batch_plan`, in `count_units`), and `fca_select` + `merge`
pick, weigh and gather the units from the scores (a rule's registered `stat`, read where the GPU
computed it; a rule without one is scored on the host); the statistics, hidden states and sizes are
not copied back (the sizes once, at the end). The other rules (random, similarity, user-registered
ones) and trace=True take their decisions on the host, by the reference's own `FCAState.reduce` on
the statistics (and what the rules read) copied back (`decide_on_host`), and `merge` gathers.

numba.cuda is imported on first use (`load_cuda`, `kernels`), not with this module. Under Numba's
simulator (NUMBA_ENABLE_CUDASIM=1) the same kernels run with small tiles.
"""
from __future__ import annotations

import math
from functools import cache
from types import SimpleNamespace

import numpy as np

from .. import fca as fca_mod, reference
from ..errors import BackendError
from . import aggregate_code

_ACT_KERNELS = {reference.gelu: 1, reference.gelu_new: 2, reference.relu: 3, reference.silu: 4}  # `activate`'s codes
ACT_CODES = {name: _ACT_KERNELS[fn] for name, fn in reference.ACTIVATIONS.items()}  # 0: no activation
cuda = None  # numba.cuda, bound by `kernels()` on first use


# ---------------------------------------------------------------- finding CUDA


def load_cuda():
    """numba.cuda with a usable device (or the simulator), else a BackendError naming what is missing."""
    try:
        from numba import cuda
    except ImportError as e:  # a Numba without its CUDA target
        raise BackendError("backend 'cuda' needs Numba's CUDA target: pip install 'minifca[cuda]' "
                           f"(the numba-cuda package); importing numba.cuda failed: {e}") from None
    except Exception as e:  # noqa: BLE001 - e.g. NUMBA_CUDA_DRIVER naming no file fails at import
        raise BackendError(f"backend 'cuda' cannot run here: the CUDA driver could not be loaded "
                           f"({type(e).__name__}: {' '.join(str(e).split())})") from None
    try:
        ok = cuda.is_available()
        why = "no CUDA device found"
    except Exception as e:  # noqa: BLE001 - e.g. NUMBA_CUDA_DRIVER naming no file
        ok, why = False, f"{type(e).__name__}: {e}"
    if not ok:
        try:
            cuda.current_context()
        except Exception as e:  # noqa: BLE001 - the driver's own words say what is missing
            why = f"{type(e).__name__}: {e}"
        raise BackendError(f"backend 'cuda' cannot run here: no usable NVIDIA GPU/driver ({' '.join(why.split())}). "
                           "Use backend='numba' or 'numpy', or NUMBA_ENABLE_CUDASIM=1 for Numba's simulator") from None
    return cuda


def simulated() -> bool:
    from numba.core import config
    return bool(config.ENABLE_CUDASIM)


def _simulator_shared_arrays_atomic():
    """Make Numba's simulator hand every thread of a block the same shared array, always.

    The simulator runs a block's threads as Python threads and finds a shared array by the source
    line that asks for it, with a look-up then an insert into a dict: two threads interleaving
    there each get an array of their own, and the kernel then reads memory its block never wrote
    (seen as a whole matmul tile wrong in ~1 of 60 launches with sys.setswitchinterval(1e-6), and
    as a rare wrong forward in the test suite). Here the look-up and insert happen under a lock.
    """
    import sys
    import threading

    from numba.core import types
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support
    cls = kernelapi.FakeCUDAShared
    if getattr(cls, "_one_array_per_line", False):
        return
    plain, lock = cls.array, threading.Lock()

    def array(self, shape, dtype):
        if shape == 0:                                   # dynamic shared memory: one buffer already
            return plain(self, shape, dtype)
        caller = sys._getframe(1)
        where = (caller.f_code.co_filename, caller.f_lineno)  # the simulator's own key
        with lock:
            res = self._allocations.get(where)
            if res is None:
                dt = numpy_support.as_dtype(dtype) if isinstance(dtype, types.Type) else dtype
                res = self._allocations[where] = np.empty(shape, dt)
        return res

    cls.array, cls._one_array_per_line = array, True


# ---------------------------------------------------------------- the kernels


# matmul tiles (BM, BN, BK, TM, TN, contiguous): a block computes BM x BN outputs, BK deep per
# step, each thread TM x TN of them: rows ty + m*TY (strided) or ty*TM + m (contiguous, so a
# thread's TM values sit side by side in shared memory and may load as one vector)
TILES = {"64x64": (64, 64, 16, 4, 4, False), "128x128": (128, 128, 8, 8, 8, False),
         "32x32c": (32, 32, 16, 2, 2, True), "64x64c": (64, 64, 16, 4, 4, True),
         "128x64c": (128, 64, 16, 8, 4, True), "128x128c": (128, 128, 8, 8, 8, True)}
SIM_TILES = (8, 8, 4, 4, 4)                          # under the simulator: tiny blocks, the layout kept
DEFAULT_TILES = "64x64c"  # on an H100 as fast as 64x64 within noise, with fewer registers (docs/bench_cuda.md)


# the kernels `kernels()` compiles, by name (the CUDA tests and the kernel profile spy on them).
# attention: full layers (and probabilities); attention_abar: FCA layers (Abar only); head_mean: Abar from
# probabilities, only at an FCA layer whose probabilities are asked for too
KERNEL_NAMES = ("matmul_bias_act", "embed_gather", "add_ln", "attention", "attention_abar", "head_mean", "stats",
                "fca_norms", "fca_select", "merge")


@cache
def kernels(sim: bool, tiles: str = DEFAULT_TILES):
    """Compile-time tile sizes are closure constants: GPU-sized, or tiny under the simulator."""
    global cuda  # a module global: the simulator swaps it inside kernels for its fake module
    cuda = load_cuda()
    if sim:
        _simulator_shared_arrays_atomic()
    from numba import float32, float64, int32
    BM, BN, BK, TM, TN, CONTIG = TILES[tiles]
    if sim:
        BM, BN, BK, TM, TN = SIM_TILES
    TX, TY = BN // TN, BM // TM                      # threads of a matmul block: TX x TY
    NT = TX * TY
    PAD = 4 if CONTIG else 1                         # shared tiles padded: few bank conflicts on the transposed
    BMP, BNP = BM + PAD, BN + PAD                    # store (and rows 16-byte aligned when contiguous)
    TPB = 4 if sim else 128                          # threads of a row-wise block (power of 2)
    MAXN, DMAX = 512, 256                            # longest sequence, largest head size
    INF = float32(np.inf)

    @cuda.jit(device=True)
    def block_sum(v, buf):
        tid = cuda.threadIdx.x
        buf[tid] = v
        cuda.syncthreads()
        s = TPB // 2
        while s > 0:
            if tid < s:
                buf[tid] += buf[tid + s]
            cuda.syncthreads()
            s //= 2
        r = buf[0]
        cuda.syncthreads()
        return r

    @cuda.jit(device=True)
    def block_max(v, buf):
        tid = cuda.threadIdx.x
        buf[tid] = v
        cuda.syncthreads()
        s = TPB // 2
        while s > 0:
            if tid < s:
                buf[tid] = max(buf[tid], buf[tid + s])
            cuda.syncthreads()
            s //= 2
        r = buf[0]
        cuda.syncthreads()
        return r

    @cuda.jit(device=True)
    def erf(x):  # reference.erf: Abramowitz & Stegun 7.1.26
        a = abs(x)
        t = 1.0 / (1.0 + 0.3275911 * a)
        y = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
        e = 1.0 - y * math.exp(-a * a)
        return e if x >= 0 else -e

    @cuda.jit(device=True)
    def activate(v, act):  # reference.ACTIVATIONS, by code (ACT_CODES)
        if act == 1:
            return 0.5 * v * (1.0 + erf(v * 0.7071067811865476))
        if act == 2:
            return 0.5 * v * (1.0 + math.tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)))
        if act == 3:
            return max(v, 0.0)
        if act == 4:
            return v / (1.0 + math.exp(-v))
        return v

    @cuda.jit
    def matmul_bias_act(A, W, bias, act, C):
        """C = act(A @ W.T + bias): A [M, K], W [N, K] (the checkpoint's [out, in]), C [M, N]."""
        M, K = A.shape
        N = W.shape[0]
        As = cuda.shared.array((BK, BMP), float32)
        Ws = cuda.shared.array((BK, BNP), float32)
        acc = cuda.local.array((TM, TN), float32)
        a = cuda.local.array(TM, float32)
        w = cuda.local.array(TN, float32)
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        tid = ty * TX + tx
        row0, col0 = cuda.blockIdx.y * BM, cuda.blockIdx.x * BN
        for m in range(TM):
            for n in range(TN):
                acc[m, n] = 0
        for k0 in range(0, K, BK):
            for e in range(tid, BM * BK, NT):          # tiles of A and W, read along K (coalesced)
                r, kk = e // BK, e % BK
                As[kk, r] = A[row0 + r, k0 + kk] if row0 + r < M and k0 + kk < K else 0
            for e in range(tid, BN * BK, NT):
                r, kk = e // BK, e % BK
                Ws[kk, r] = W[col0 + r, k0 + kk] if col0 + r < N and k0 + kk < K else 0
            cuda.syncthreads()
            for kk in range(BK):
                for m in range(TM):
                    a[m] = As[kk, ty * TM + m if CONTIG else ty + m * TY]
                for n in range(TN):
                    w[n] = Ws[kk, tx * TN + n if CONTIG else tx + n * TX]
                for m in range(TM):
                    for n in range(TN):
                        acc[m, n] += a[m] * w[n]
            cuda.syncthreads()
        for m in range(TM):
            r = row0 + (ty * TM + m if CONTIG else ty + m * TY)
            for n in range(TN):
                c = col0 + (tx * TN + n if CONTIG else tx + n * TX)
                if r < M and c < N:
                    C[r, c] = activate(acc[m, n] + bias[c], act)

    @cuda.jit
    def embed_gather(ids, tt, word, pos, typ, out):
        """out[b*L + l] = word[ids[b, l]] + pos[l] + typ[tt[b, l]]."""
        row = cuda.blockIdx.x
        L = ids.shape[1]
        b, l = row // L, row % L
        for c in range(cuda.threadIdx.x, out.shape[1], TPB):
            out[row, c] = word[ids[b, l], c] + pos[l, c] + typ[tt[b, l], c]

    @cuda.jit
    def add_ln(x, r, has_r, g, beta, eps, out):
        """out = LayerNorm(x + r) per row (r ignored unless has_r); out may alias x or r."""
        row = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        H = x.shape[1]
        buf = cuda.shared.array(TPB, float32)
        s = float32(0)
        for c in range(tid, H, TPB):
            s += x[row, c] + (r[row, c] if has_r else float32(0))
        mu = block_sum(s, buf) / float32(H)
        s = float32(0)
        for c in range(tid, H, TPB):
            d = x[row, c] + (r[row, c] if has_r else float32(0)) - mu
            s += d * d
        den = math.sqrt(block_sum(s, buf) / float32(H) + eps)
        for c in range(tid, H, TPB):
            v = x[row, c] + (r[row, c] if has_r else float32(0))
            out[row, c] = (v - mu) / den * g[c] + beta[c]

    @cuda.jit(device=True)
    def attend_head(qkv, mask, log_size, has_ls, b, i, hd, d, scale, qs, p, buf, ctx):
        """One query row i of head hd in sequence b: p = softmax(q K^T / scale + bias), ctx = p V.

        The block's TPB threads share the work; qs [DMAX], p [MAXN], buf [TPB] are the caller's
        shared arrays. On return p[:n] holds the probabilities (thread tid wrote p[j] for
        j = tid, tid + TPB, ...), ctx[b*n + i, hd*d : hd*d + d] the context, and the block is
        synchronised (p, qs and buf may be overwritten).
        """
        tid = cuda.threadIdx.x
        n = mask.shape[1]
        H = ctx.shape[1]
        row = b * n + i
        for t in range(tid, d, TPB):
            qs[t] = qkv[row, hd * d + t]
        cuda.syncthreads()
        mx = -INF
        for j in range(tid, n, TPB):                 # logits of the valid keys
            if mask[b, j] > 0:
                kr = b * n + j
                dot = float32(0)
                for t in range(d):
                    dot += qs[t] * qkv[kr, H + hd * d + t]
                lg = dot / scale
                if has_ls:
                    lg += log_size[b, j]
                p[j] = lg
                mx = max(mx, lg)
        mx = block_max(mx, buf)
        s = float32(0)
        for j in range(tid, n, TPB):
            e = math.exp(p[j] - mx) if mask[b, j] > 0 else float32(0)
            p[j] = e
            s += e
        s = block_sum(s, buf)
        for j in range(tid, n, TPB):
            p[j] = p[j] / s
        cuda.syncthreads()
        if d <= TPB:                                 # G groups of d threads split the keys
            G = TPB // d
            grp, t = tid // d, tid % d
            acc = float32(0)
            if grp < G:
                for j in range(grp, n, G):
                    acc += p[j] * qkv[b * n + j, 2 * H + hd * d + t]
            buf[tid] = acc
            cuda.syncthreads()
            if tid < d:
                acc = float32(0)
                for gg in range(G):
                    acc += buf[gg * d + tid]
                ctx[row, hd * d + tid] = acc
        else:
            for t in range(tid, d, TPB):
                acc = float32(0)
                for j in range(n):
                    acc += p[j] * qkv[b * n + j, 2 * H + hd * d + t]
                ctx[row, hd * d + t] = acc
        cuda.syncthreads()                           # p and buf were read by every thread

    @cuda.jit
    def attention(qkv, mask, log_size, has_ls, n_head, scale, ctx, probs, write_probs):
        """One query row of one head (block (i, head, b)): attend_head, p written to probs when write_probs.

        qkv [B*n, 3H] (Q | K | V, heads side by side), mask/log_size [B, n], ctx [B*n, H],
        probs [B, h, n, n] (written when write_probs).
        """
        i, hd, b = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
        qs = cuda.shared.array(DMAX, float32)
        p = cuda.shared.array(MAXN, float32)
        buf = cuda.shared.array(TPB, float32)
        attend_head(qkv, mask, log_size, has_ls, b, i, hd, ctx.shape[1] // n_head, scale, qs, p, buf, ctx)
        if write_probs:
            for j in range(cuda.threadIdx.x, mask.shape[1], TPB):
                probs[b, hd, i, j] = p[j]

    @cuda.jit
    def attention_abar(qkv, mask, log_size, has_ls, n_head, scale, ctx, abar):
        """One query row, every head (block (i, b)): attend_head for heads 0, 1, ..., h-1 in turn, and
        the head-averaged row abar[b, i, :] = (sum over heads of p, in head order) / h, each j summed
        by one thread in shared memory: the same bits every run, and no [B, h, n, n] probabilities.

        qkv [B*n, 3H], mask/log_size [B, n], ctx [B*n, H], abar [B, n, n].
        """
        i, b = cuda.blockIdx.x, cuda.blockIdx.y
        tid = cuda.threadIdx.x
        n = mask.shape[1]
        d = ctx.shape[1] // n_head
        qs = cuda.shared.array(DMAX, float32)
        p = cuda.shared.array(MAXN, float32)
        buf = cuda.shared.array(TPB, float32)
        acc = cuda.shared.array(MAXN, float32)       # the row's sum over heads; j owned by thread j % TPB
        for j in range(tid, n, TPB):
            acc[j] = 0
        for hd in range(n_head):
            attend_head(qkv, mask, log_size, has_ls, b, i, hd, d, scale, qs, p, buf, ctx)
            for j in range(tid, n, TPB):             # the p[j] this thread wrote itself
                acc[j] += p[j]
        hf = float32(n_head)
        for j in range(tid, n, TPB):
            abar[b, i, j] = acc[j] / hf

    @cuda.jit
    def head_mean(probs, abar):
        """abar[b, i, j] = (sum over heads of probs[b, :, i, j], in head order) / h: thread per (b, i, j)."""
        idx = cuda.grid(1)
        B, h, n, _ = probs.shape
        if idx >= B * n * n:
            return
        b, i, j = idx // (n * n), idx // n % n, idx % n
        a = float32(0)
        for hd in range(h):
            a += probs[b, hd, i, j]
        abar[b, i, j] = a / float32(h)

    @cuda.jit
    def stats(abar, mask, received, cls, entropy):
        """reference.attention_stats for unit j of sequence b (one thread each), from the head-averaged
        attention abar [B, n, n]."""
        idx = cuda.grid(1)
        B, n, _ = abar.shape
        if idx >= B * n:
            return
        b, j = idx // n, idx % n
        rec, ent = float32(0), float32(0)
        for i in range(n):
            a = abar[b, i, j]                        # Abar[i, j]
            if mask[b, i] > 0:
                rec += a
            if i == j:
                rec -= a
            if i == 0:
                cls[b, j] = a * mask[b, j]
            a = abar[b, j, i]                        # Abar[j, i]: unit j's own row
            ent -= a * math.log(max(a, float32(1e-30)))
        received[b, j] = rec * mask[b, j]
        entropy[b, j] = ent * mask[b, j]

    @cuda.jit
    def fca_norms(x, s):
        """fca.hidden_norm: s[b, j] = sqrt(sum_c x[b*n + j, c]^2) in float64, one block per row of x [B*n, H]."""
        row = cuda.blockIdx.x
        n = s.shape[1]
        buf = cuda.shared.array(TPB, float64)
        acc = float64(0)
        for c in range(cuda.threadIdx.x, x.shape[1], TPB):
            v = float64(x[row, c])
            acc += v * v
        acc = block_sum(acc, buf)
        if cuda.threadIdx.x == 0:
            s[row // n, row % n] = math.sqrt(acc)

    @cuda.jit(device=True)
    def put_size(new_sizes, log_sizes, b, u, v):
        new_sizes[b, u] = v
        log_sizes[b, u] = math.log(max(v, float32(1e-30)))          # the next layer's proportional attention

    @cuda.jit(device=True)
    def chunk_start(g, q, big):
        """np.array_split of m = c*q + big members into c chunks (the first `big` one longer): chunk g's first."""
        return g * (q + 1) if g < big else big * (q + 1) + (g - big) * q

    @cuda.jit(device=True)
    def chunk_of(r, q, big):
        """The chunk member r falls in (the inverse of chunk_start)."""
        return r // (q + 1) if r < big * (q + 1) else big + (r - big * (q + 1)) // max(q, 1)

    @cuda.jit
    def fca_select(s, mask, sizes, plan, agg, lo, hi, src, w, new_sizes, log_sizes):
        """fca.reduce_batch's decisions for sequence b (one block each), as a gather plan for `merge`.

        s, mask, sizes [B, n] (scores, any float type); plan [B, 3] int32: k, c, active (fca.batch_plan);
        agg: 0 drop, 1 mean (size-weighted), 2 softmax of the scores in each group (weighted, clusters).
        Writes output unit u of sequence b as entries lo[b*N+u]:hi[b*N+u] of (src, w), rows of the
        [B*n, H] input and float64 weights (the entries of b sit in b*n : b*n+n: kept units first,
        then U in order); new_sizes and log_sizes [B, N], zero-size padding after the last unit.
        Ranks and places are counted (O(n^2 / threads)), every group's sums run in member order.
        """
        b, tid = cuda.blockIdx.x, cuda.threadIdx.x
        n, N = mask.shape[1], new_sizes.shape[1]
        k, c, active = plan[b, 0], plan[b, 1], plan[b, 2] != 0
        sv = cuda.shared.array(MAXN, float64)       # scores
        vld = cuda.shared.array(MAXN, int32)        # 1 = a valid unit
        kind = cuda.shared.array(MAXN, int32)       # 1 kept (fine, or every unit when not active), 2 in U, 0 neither
        memb = cuda.shared.array(MAXN, int32)       # U in sequence order: the unit of each member
        e = cuda.shared.array(MAXN, float64)        # a member's exp(s - group max)
        gval = cuda.shared.array(MAXN, float64)     # per coarse unit: sum of sizes (mean) or max, then sum of e
        ibuf = cuda.shared.array(TPB, int32)
        for j in range(tid, n, TPB):
            sv[j] = s[b, j]
            vld[j] = 1 if mask[b, j] > 0 else 0
        cuda.syncthreads()
        first = 0                                   # [CLS]: the first valid unit
        while first < n and vld[first] == 0:
            first += 1
        for j in range(tid, n, TPB):                # [CLS] + the k-1 best others; ties go to the earlier unit
            kd = vld[j]
            if kd == 1 and active and j != first:
                rank = 0
                for i in range(n):
                    if vld[i] == 1 and i != first and (sv[i] > sv[j] or (sv[i] == sv[j] and i < j)):
                        rank += 1
                if rank >= k - 1:
                    kd = 0 if agg == 0 else 2
            kind[j] = kd
        cuda.syncthreads()
        nk, nm = 0, 0
        for j in range(tid, n, TPB):
            nk += 1 if kind[j] == 1 else 0
            nm += 1 if kind[j] == 2 else 0
        n_keep = block_sum(nk, ibuf)                # kept units, then the m members of U
        m = block_sum(nm, ibuf)
        base = b * n                                # this sequence's rows of x and entries
        for j in range(tid, n, TPB):                # place of each unit among its kind, by counting
            kd = kind[j]
            if kd > 0:
                place = 0
                for i in range(j):
                    place += 1 if kind[i] == kd else 0
                if kd == 1:                         # copied as it is: one entry of weight 1
                    src[base + place] = base + j
                    w[base + place] = 1.0
                    lo[b * N + place] = base + place
                    hi[b * N + place] = base + place + 1
                    put_size(new_sizes, log_sizes, b, place, sizes[b, j])
                else:
                    memb[place] = j
                    src[base + n_keep + place] = base + j
        cuda.syncthreads()
        cg = c if active and agg != 0 and m > 0 else 0
        cb = max(cg, 1)
        q, big = m // cb, m % cb                    # np.array_split: the first `big` chunks are q + 1 long
        for g in range(tid, cg, TPB):               # one thread per coarse unit, its members in order
            g0, g1 = chunk_start(g, q, big), chunk_start(g + 1, q, big)
            lo[b * N + n_keep + g] = base + n_keep + g0
            hi[b * N + n_keep + g] = base + n_keep + g1
            total = float32(0)
            top = -math.inf
            for r in range(g0, g1):
                total += float32(sizes[b, memb[r]])
                top = max(top, sv[memb[r]])
            put_size(new_sizes, log_sizes, b, n_keep + g, total)
            gval[g] = total if agg == 1 else top
        cuda.syncthreads()
        for r in range(tid, m if cg > 0 else 0, TPB):  # each member: its group, its weight (or exp)
            g = chunk_of(r, q, big)
            if agg == 1:
                w[base + n_keep + r] = float32(sizes[b, memb[r]]) / float32(gval[g])
            else:
                e[r] = math.exp(sv[memb[r]] - gval[g])
        cuda.syncthreads()
        if agg == 2:
            for g in range(tid, cg, TPB):           # softmax denominators, summed in member order
                tot = float64(0)
                for r in range(chunk_start(g, q, big), chunk_start(g + 1, q, big)):
                    tot += e[r]
                gval[g] = tot
            cuda.syncthreads()
            for r in range(tid, m if cg > 0 else 0, TPB):
                w[base + n_keep + r] = e[r] / gval[chunk_of(r, q, big)]
        for u in range(n_keep + cg + tid, N, TPB):  # padding: no entries, size 0
            lo[b * N + u] = 0
            hi[b * N + u] = 0
            put_size(new_sizes, log_sizes, b, u, float32(0))

    @cuda.jit
    def merge(x, lo, hi, src, w, out):
        """out[r] = sum_e w[e] x[src[e]] over e in lo[r]:hi[r] (float64 sums, as fca.merge / fca.reduce_batch)."""
        r = cuda.blockIdx.x
        for c in range(cuda.threadIdx.x, out.shape[1], TPB):
            acc = float64(0)
            for e in range(lo[r], hi[r]):
                acc += w[e] * x[src[e], c]
            out[r, c] = acc

    return SimpleNamespace(cuda=cuda, BM=BM, BN=BN, TX=TX, TY=TY, TPB=TPB, MAXN=MAXN, DMAX=DMAX,
                           matmul_bias_act=matmul_bias_act, embed_gather=embed_gather, add_ln=add_ln,
                           attention=attention, attention_abar=attention_abar,
                           head_mean=head_mean, stats=stats, fca_norms=fca_norms, fca_select=fca_select,
                           merge=merge)


# ---------------------------------------------------------------- device weights


def _f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def _resident(a):
    """Is `a` a device array (an activation the forward keeps on the GPU)?"""
    return hasattr(a, "copy_to_host")


def upload_params(cuda, params):
    """The parameter dict as device arrays, with the same keys (`reference.bert_forward` unpacks it as it
    does the host one). Each layer's Q/K/V are uploaded as one fused [3H, H] projection, and q, k, v are
    views of it; returns (the dict, {id of a layer's q weight view: its fused projection})."""
    up = lambda a: cuda.to_device(_f32(a))
    lin = lambda p: {"w": up(p["w"]), "b": up(p["b"])}
    ln = lambda p: {"g": up(p["g"]), "b": up(p["b"])}
    e = params["embeddings"]
    layers, fused = [], {}
    for p in params["layers"]:
        a = p["attn"]
        H = a["q"]["w"].shape[0]
        qkv = SimpleNamespace(w=up(np.concatenate([a[k]["w"] for k in "qkv"])),
                              b=up(np.concatenate([a[k]["b"] for k in "qkv"])))  # [3H, H], [3H]
        attn = {name: {"w": qkv.w[j * H:(j + 1) * H], "b": qkv.b[j * H:(j + 1) * H]} for j, name in enumerate("qkv")}
        attn["o"] = lin(a["o"])
        fused[id(attn["q"]["w"])] = qkv
        layers.append({"attn": attn, "attn_ln": ln(p["attn_ln"]), "ffn": {"i": lin(p["ffn"]["i"]), "o": lin(p["ffn"]["o"])},
                       "ffn_ln": ln(p["ffn_ln"])})
    return {"embeddings": {"word": up(e["word"]), "position": up(e["position"]), "token_type": up(e["token_type"]),
                           "ln": ln(e["ln"])}, "layers": layers}, fused


# ---------------------------------------------------------------- the ops object


class CudaOps:
    """The ops contract (kernels/__init__.py) on the GPU: `reference.bert_forward(..., ops=CudaOps(params))`.

    Each op takes host arrays and gives host arrays back (so each is tested against the reference), or
    takes the device arrays of `resident_params` and of its own outputs and gives device arrays back: a
    forward keeps the batch on the device between layers, the weights are uploaded once per model, and
    only what the loop hands `to_host` (the outputs) is copied back. FCA with the rules registered as
    batched and no trace is decided on the device (`reduce`): the host only counts (`count_units`).
    Build one per model with `ops_for`.
    """

    def __init__(self, params=None, tiles=DEFAULT_TILES):
        self.kern = kernels(simulated(), tiles)   # the compiled kernels (a namespace)
        self.cuda = self.kern.cuda
        self.params = params
        self.dev, self._qkv = upload_params(self.cuda, params) if params is not None else (None, {})
        self._ws = {}
        self._mask = (None, None)          # the last host mask uploaded by a forward, and its device copy
        self._log_size = (None, None)      # the sizes the last device reduction made, and their logs
        self._x = 0                        # which workspace buffer (x0 or x1) holds the forward's hidden states

    # ------------------------------------------------------------ device-level steps
    def _buf(self, name, shape, dtype=np.float32):
        """A view of a workspace buffer kept between calls (grown when too small)."""
        size = int(np.prod(shape))
        flat = self._ws.get(name)
        if flat is None or flat.size < size or flat.dtype != dtype:
            flat = self._ws[name] = self.cuda.device_array(max(size, 1), dtype=dtype)
        return flat[:size].reshape(shape)

    def _linear(self, x, w, b, act=0, out=None, name="lin"):          # [R, in] -> [R, out]
        kern = self.kern
        M, N = x.shape[0], w.shape[0]
        out = self._buf(name, (M, N)) if out is None else out
        grid = ((N + kern.BN - 1) // kern.BN, (M + kern.BM - 1) // kern.BM)
        kern.matmul_bias_act[grid, (kern.TX, kern.TY)](x, w, b, act, out)
        return out

    def _add_ln(self, x, r, g, b, eps, out):                           # [R, H]
        self.kern.add_ln[x.shape[0], self.kern.TPB](x, x if r is None else r, r is not None, g, b, np.float32(eps), out)
        return out

    def _embed(self, ids, tt, word, position, token_type, g, b, eps, out):  # [B, L] -> [B*L, H]
        B, L = ids.shape
        if L > position.shape[0]:
            raise BackendError(f"input length {L} exceeds the position table ({position.shape[0]})")
        ids_d = self.cuda.to_device(np.ascontiguousarray(ids, np.int64))
        tt_d = self.cuda.to_device(np.ascontiguousarray(tt, np.int64))
        self.kern.embed_gather[B * L, self.kern.TPB](ids_d, tt_d, word, position, token_type, out)
        return self._add_ln(out, None, g, b, eps, out)

    def _attention(self, x, mask, log_size, qkv_lin, o_lin, n_head, want_probs, want_stats):
        """x [B*n, H] (device), mask/log_size [B, n] (host or device) -> out [B*n, H], probs, stats, qkv (device)."""
        kern = self.kern
        B, n = mask.shape
        H = x.shape[1]
        d = H // n_head
        if n > kern.MAXN or d > kern.DMAX:
            raise BackendError(f"backend 'cuda' supports sequences up to {kern.MAXN} units and heads up to {kern.DMAX} "
                               f"wide; got n={n}, head size {d}")
        qkv = self._linear(x, qkv_lin.w, qkv_lin.b, name="qkv")      # [B*n, 3H]
        ctx = self._buf("ctx", (B * n, H))                              # [B*n, H]
        mask_d = self._dev(mask)
        ls = self._dev(log_size) if log_size is not None else mask_d
        args = (qkv, mask_d, ls, log_size is not None, n_head, np.float32(np.sqrt(d)), ctx)
        probs = abar = None
        if want_stats and not want_probs:                               # an FCA layer: Abar only, h x smaller
            abar = self._buf("abar", (B, n, n))                         # [B, n, n]
            kern.attention_abar[(n, B), kern.TPB](*args, abar)
        else:
            probs = self._buf("probs", (B, n_head, n, n)) if want_probs else self._buf("no_probs", (1, 1, 1, 1))
            kern.attention[(n, n_head, B), kern.TPB](*args, probs, want_probs)
            if want_stats:
                abar = self._head_mean(probs)                           # [B, h, n, n] -> [B, n, n]
        out = self._linear(ctx, o_lin.w, o_lin.b, name="attn_out")     # [B*n, H]
        st = self._stats(abar, mask_d) if want_stats else None
        return out, probs, st, qkv

    def _head_mean(self, probs):                                        # [B, h, n, n] -> [B, n, n]
        B, _, n, _ = probs.shape
        abar = self._buf("abar", (B, n, n))
        self.kern.head_mean[(B * n * n + 127) // 128, 128](probs, abar)
        return abar

    def _stats(self, abar, mask_d):                                     # [B, n, n] -> {name: [B, n]}
        B, n, _ = abar.shape
        st = {name: self._buf("stat_" + name, (B, n)) for name in ("received", "cls", "entropy")}
        self.kern.stats[(B * n + 127) // 128, 128](abar, mask_d, st["received"], st["cls"], st["entropy"])
        return st

    def _merge(self, x, row_ptr, src, w, out):                          # [R, H] -> [R', H]
        cuda = self.cuda
        rp = cuda.to_device(row_ptr)
        self.kern.merge[out.shape[0], self.kern.TPB](x, rp[:-1], rp[1:], cuda.to_device(src), cuda.to_device(w), out)
        return out

    def _fca_reduce(self, x, s, mask_d, sizes_d, plan, agg, new_x, new_sizes, log_sizes):
        """fca.reduce_batch on the device: x [B*n, H], scores s, mask_d, sizes_d [B, n] (device) and the
        host counts plan (k, c, active: [B] each) -> new_x [B*N, H], new_sizes, log_sizes [B, N] (device)."""
        kern = self.kern
        B, n = mask_d.shape
        N = new_sizes.shape[1]
        if n > kern.MAXN:
            raise BackendError(f"backend 'cuda' supports sequences up to {kern.MAXN} units; got n={n}")
        lo, hi = self._buf("fca_lo", (B * N,), np.int32), self._buf("fca_hi", (B * N,), np.int32)
        src, w = self._buf("fca_src", (B * n,), np.int32), self._buf("fca_w", (B * n,), np.float64)
        plan_d = self.cuda.to_device(np.stack([plan.k, plan.c, plan.active], 1).astype(np.int32))  # [B, 3]
        if B * N:
            kern.fca_select[B, kern.TPB](s, mask_d, sizes_d, plan_d, agg, lo, hi, src, w, new_sizes, log_sizes)
            kern.merge[B * N, kern.TPB](x, lo, hi, src, w, new_x)
        return new_x

    def _hidden_norms(self, x, B, n):                                   # [B*n, H] -> [B, n] float64
        s = self._buf("fca_score", (B, n), np.float64)
        self.kern.fca_norms[B * n, self.kern.TPB](x, s)
        return s

    # ------------------------------------------------------------ reference names, host arrays
    def _up(self, a):
        return self.cuda.to_device(_f32(a))

    def _dev(self, a):                                                  # a device array as it is, else uploaded
        return a if hasattr(a, "copy_to_host") else self._up(a)

    def _mask_dev(self, mask):                                          # a forward's mask, uploaded once
        if self._mask[0] is not mask:
            self._mask = (mask, self._up(mask))
        return self._mask[1]

    def _scores(self, score, stats, x, B, n):                           # -> [B, n] on the device
        """A batched rule's scores: the statistic it returns as it is, where the GPU computed it (the
        `stats` or `fca_norms` kernel), else the rule itself on the host, from what it reads."""
        facts = fca_mod.score_facts(score)
        if facts.stat in fca_mod.ATTENTION_STATS:
            return stats[facts.stat]                                    # float32
        if facts.stat == "hidden_norm":
            return self._hidden_norms(x, B, n)                          # float64
        xh = x.copy_to_host().reshape(B, n, -1) if facts.hidden else None
        sh = None if stats is None else {name: v.copy_to_host() for name, v in stats.items()}
        return self.cuda.to_device(np.asarray(fca_mod.SCORES[score](sh, xh, None, None), np.float64))

    # ------------------------------------------------------------ the ops contract
    def resident_params(self, params):
        if params is not self.params:  # another parameter dict: upload it once and keep it
            self.params = params
            self.dev, self._qkv = upload_params(self.cuda, params)
        return self.dev

    def to_host(self, a):
        return a.copy_to_host() if _resident(a) else a

    def pack(self, x, mask):
        return x                                                     # the padded batch, as the reference

    def log_size(self, sizes):
        if not _resident(sizes):
            return reference.log_size(sizes)
        made, logs = self._log_size
        return logs if made is sizes else reference.log_size(sizes.copy_to_host())

    def linear(self, x, w, b):
        x = _f32(x)
        out = self._linear(self._up(x.reshape(-1, x.shape[-1])), self._up(w), self._up(b))
        return out.copy_to_host().reshape(*x.shape[:-1], w.shape[0])

    def embeddings(self, ids, tt, word, position, token_type, ln, eps):
        B, L = np.shape(ids)
        H = word.shape[1]
        if _resident(word):                                             # a forward: into its x0 buffer
            self._x = 0
            x = self._embed(ids, tt, word, position, token_type, ln["g"], ln["b"], eps, self._buf("x0", (B * L, H)))
            return x.reshape(B, L, H)
        out = self._buf("emb", (B * L, H))
        out = self._embed(ids, tt, self._up(word), self._up(position), self._up(token_type),
                          self._up(ln["g"]), self._up(ln["b"]), eps, out)
        return out.copy_to_host().reshape(B, L, -1)

    def attention(self, x, mask, log_size, q, k, v, o, n_head, want_probs=True, want_stats=False):
        B, n, H = x.shape
        if _resident(x):                                                # the keys stay in the fused QKV output
            out, probs, st, qkv = self._attention(x.reshape(B * n, H), self._mask_dev(mask), log_size,
                                                  self._qkv[id(q["w"])], SimpleNamespace(**o), n_head,
                                                  want_probs, want_stats)
            return out.reshape(B, n, H), probs if want_probs else None, st, qkv
        qkv_lin = SimpleNamespace(w=self._up(np.concatenate([q["w"], k["w"], v["w"]])),
                                  b=self._up(np.concatenate([q["b"], k["b"], v["b"]])))
        o_lin = SimpleNamespace(w=self._up(o["w"]), b=self._up(o["b"]))
        out, probs, st, qkv = self._attention(self._up(_f32(x).reshape(B * n, H)), mask, log_size, qkv_lin, o_lin,
                                              n_head, want_probs, want_stats)
        keys = qkv.copy_to_host()[:, H:2 * H].reshape(B, n, H)
        return (out.copy_to_host().reshape(B, n, H), probs.copy_to_host() if want_probs else None,
                None if st is None else {name: a.copy_to_host() for name, a in st.items()}, keys)

    def attention_stats(self, probs, mask):                             # probs [B, h, n, n] -> {name: [B, n]}
        st = self._stats(self._head_mean(self._up(probs)), self._up(mask))
        return {name: a.copy_to_host() for name, a in st.items()}

    def add_layer_norm(self, x, residual, g, b, eps):
        shape = x.shape
        if _resident(x):                                                # in place, over the residual
            B, n, H = shape
            r = residual.reshape(B * n, H)
            return self._add_ln(x.reshape(B * n, H), r, g, b, eps, r).reshape(B, n, H)
        x2 = self._up(x).reshape(-1, shape[-1])
        out = self._add_ln(x2, self._up(residual).reshape(-1, shape[-1]), self._up(g), self._up(b), eps,
                           self._buf("ln", x2.shape))
        return out.copy_to_host().reshape(shape)

    def ffn(self, x, i, o, act):
        shape = x.shape
        if _resident(x):
            B, n, H = shape
            h = self._linear(x.reshape(B * n, H), i["w"], i["b"], ACT_CODES[act], name="inter")  # [B*n, I]
            return self._linear(h, o["w"], o["b"], name="ffn_out").reshape(B, n, H)           # [B*n, H]
        h = self._linear(self._up(x).reshape(-1, shape[-1]), self._up(i["w"]), self._up(i["b"]), ACT_CODES[act],
                         name="inter")
        return self._linear(h, self._up(o["w"]), self._up(o["b"])).copy_to_host().reshape(shape)

    def reduce(self, state, layer, cfg, x, mask, sizes, stats, keys):
        """reference.reduce on the device: the rules registered as batched (no trace) decide there, the host
        only counting (`count_units`); the others decide on the host (`decide_on_host`, from the statistics and
        what the rules read, copied back) and the `merge` kernel gathers. Host arrays: the reference's."""
        if not _resident(x):
            return state.reduce(layer, cfg, x, mask, sizes, stats, keys, self.reduce_batch)
        B, n, H = x.shape
        x2 = x.reshape(B * n, H)
        self._x = 1 - self._x                                           # merge into the other buffer
        if state.batched(cfg):
            plan = count_units(state, layer, cfg, mask)                 # counts only: no scores needed
            N = plan.mask.shape[1]
            new_sizes, logs = self._buf(f"sizes{self._x}", (B, N)), self._buf("log_size", (B, N))
            new_x = self._fca_reduce(x2, self._scores(cfg.score, stats, x2, B, n), self._mask_dev(mask),
                                     self._dev(sizes), plan, aggregate_code(cfg.aggregate),
                                     self._buf(f"x{self._x}", (B * N, H)), new_sizes, logs)  # [B*N, H]
            self._log_size = (new_sizes, logs)
            return new_x.reshape(B, N, H), plan.mask, new_sizes
        xh = x.copy_to_host() if fca_mod.score_facts(cfg.score).hidden else None
        kh = keys.copy_to_host()[:, H:2 * H].reshape(B, n, H) if not fca_mod.aggregate_facts(cfg.aggregate).batched \
            else None                                                   # batched aggregates read no keys
        stats = None if stats is None else {name: v.copy_to_host() for name, v in stats.items()}
        row_ptr, src, w, mask, sizes = decide_on_host(state, layer, cfg, mask, self.to_host(sizes), stats, xh, kh)
        new_x = self._merge(x2, row_ptr, src, w, self._buf(f"x{self._x}", (B * mask.shape[1], H)))  # [B*n', H]
        return new_x.reshape(B, mask.shape[1], H), mask, sizes

    def reduce_batch(self, s, x, sizes, valid, k, c, active, aggregate):
        """fca.reduce_batch by the `fca_select` and `merge` kernels: same arguments, same host arrays back.

        Sizes are handled as float32 on the device (as the forward keeps them) and returned in sizes' dtype.
        """
        B, n, H = x.shape
        valid, sizes = np.asarray(valid, bool), np.asarray(sizes)
        k, c, active = (np.asarray(a).astype(np.int64) for a in (k, c, active))
        N = int(fca_mod.units_out(valid, k, c, active > 0).max()) if B else 0
        plan = SimpleNamespace(k=k, c=c, active=active)
        new_x, new_sizes, log_sizes = (self._buf("rb_x", (B * N, H)), self._buf("rb_sizes", (B, N)),
                                       self._buf("rb_log_sizes", (B, N)))
        agg = aggregate_code(aggregate)
        self._fca_reduce(self._up(np.reshape(x, (B * n, H))), self.cuda.to_device(np.asarray(s, np.float64)),
                         self._up(valid), self._up(sizes), plan, agg, new_x, new_sizes, log_sizes)
        if not B * N:
            return np.zeros((B, N, H), x.dtype), np.zeros((B, N), sizes.dtype)
        return (new_x.copy_to_host().reshape(B, N, H).astype(x.dtype, copy=False),
                new_sizes.copy_to_host().astype(sizes.dtype, copy=False))



# ---------------------------------------------------------------- FCA: what the host decides


def count_units(state, layer, cfg, mask):
    """The host's whole part of an FCA layer on the device path: how many units each sequence keeps
    and makes (`fca.batch_plan`, from the mask alone), recorded on the state (units for FLOPs)."""
    plan = fca_mod.batch_plan(cfg, layer, state.n_tokens, mask > 0)
    state.record_plan(layer, plan)
    return plan


def decide_on_host(state, layer, cfg, mask, sizes, stats, x=None, keys=None):
    """FCA's decisions for a batch, as a gather plan for the `merge` kernel.

    mask, sizes [B, n]; stats {name: [B, n]}; x, keys [B, n, H] or None when the rules do not read
    them. `FCAState.reduce` decides and records the layer (units, trace). When the score does not
    read the hidden states it is handed the identity instead, and what it returns is the merge
    matrix itself ([B, n', n]: row u holds the weights of the input units in output unit u);
    otherwise the plan repeats each sequence's `reduce_sequence` (same seeded rng, same decisions).
    Returns row_ptr [B*n'+1], src [nnz] (rows of the [B*n, H] input), w [nnz] (float64), the new
    mask and sizes [B, n'].
    """
    B, n = mask.shape
    none = np.zeros((B, n, 0), np.float32)
    keys = none if keys is None else keys
    if x is None:
        eye = np.broadcast_to(np.eye(n), (B, n, n))                      # [B, n, n] float64: exact weights
        M, new_mask, new_sizes = state.reduce(layer, cfg, eye, mask, sizes, stats, keys)  # M [B, n', n]
    else:
        _, new_mask, new_sizes = state.reduce(layer, cfg, x, mask, sizes, stats, keys)
        M = np.zeros((B, new_mask.shape[1], n))
        for b in range(B):
            valid = np.flatnonzero(mask[b] > 0)
            rng = np.random.default_rng([cfg.seed, layer, int(state.seeds[b]) & 0xFFFFFFFF])  # as FCAState.reduce
            st = {name: v[b, valid] for name, v in (stats or {}).items()}
            fine, rest, groups, w = fca_mod.reduce_sequence(cfg, layer, x[b, valid], sizes[b, valid], st,
                                                            keys[b, valid], rng, int(state.n_tokens[b]))
            eye = np.eye(n)[valid]                                       # [n_valid, n]
            M[b, :len(fine) + (groups.max() + 1 if (groups >= 0).any() else 0)] = \
                fca_mod.merge(eye, sizes[b, valid], fine, rest, groups, w)[0]
    rows, cols = np.nonzero(M.reshape(-1, n))                          # [nnz] output row, input unit
    b = rows // M.shape[1]
    row_ptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=B * M.shape[1]))]).astype(np.int64)
    return row_ptr, (b * n + cols).astype(np.int64), M.reshape(-1, n)[rows, cols], new_mask, new_sizes


def ops_for(model) -> CudaOps:
    """The CUDA ops of a model, built (weights uploaded) once and kept on the model object."""
    ops = getattr(model, "_cuda_ops", None)
    if ops is None:
        ops = model._cuda_ops = CudaOps(model.params)
    return ops
