"""Sentence similarity: how well cosines of embeddings rank sentence pairs (STS Benchmark), with and without FCA.

    spearman             rank correlation with tied ranks averaged (what MTEB's STSBenchmark score is)
    evaluate_similarity  embed both sides of every pair (sorted batching, the checkpoint's pooling), score each
                         pair by the cosine of its embeddings, Spearman against the gold scores; FLOPs of the pass
"""
from __future__ import annotations

import numpy as np

from .data import Similarity, read_sts
from .progress import progress as progress_bar
from .sentence import pool


def ranks(x) -> np.ndarray:
    """[N] float64 ranks 1..N of x, tied values sharing the mean of their ranks."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")                             # [N]
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)                              # [N] ranks, ties not yet shared
    _, group, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(group, weights=r)                             # [G] rank sums per distinct value
    return (sums / counts)[group]                                    # [N] each value's mean rank


def spearman(a, b) -> float:
    """Spearman's rho: Pearson's correlation of the (tie-averaged) ranks; NaN when one side is constant (no
    ranking to correlate)."""
    ra, rb = ranks(a), ranks(b)
    if np.ptp(ra) == 0 or np.ptp(rb) == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def embedding_pass(model, batches, fca=None, bar=None):
    """One pass over batches [(rows, Encoding)]: the embeddings [N, H] float64 in data order (rows give each
    batch's places), pooled as the checkpoint says (mean by default), the FLOPs with fca and the full model's
    FLOPs on the real tokens. bar: a progress bar (minifca.progress) counting the texts, or None."""
    parts, flops, full = [], 0, 0
    for rows, enc in batches:
        out = model(enc, fca=fca)
        if bar is not None:
            bar.update(len(rows))
        parts.append((rows, pool(out.last_hidden_state, out.mask, out.sizes, model.sentence.pooling)))
        flops, full = flops + out.flops, full + out.flops_full
    emb = np.empty((sum(len(r) for r, _ in parts), model.config.hidden_size))  # [N, H]
    for rows, v in parts:
        emb[rows] = v                                                # [b, H] into data order
    return emb, flops, full


def pair_embeddings(model, data: Similarity, fca=None, batch_size=64, bar=None):
    """(first [N, H], second [N, H], FLOPs with fca, the full model's FLOPs): every sentence of the pairs
    embedded once, in sorted batches and with the checkpoint's truncation, as `model.embed` does."""
    texts, max_length, truncation = model.sentence_inputs(data.texts + data.pairs)  # [2N]
    emb, flops, full = embedding_pass(model, model.batches(texts, None, batch_size, max_length, truncation), fca, bar)
    return emb[:len(data)], emb[len(data):], flops, full


def cosines(a, b) -> np.ndarray:
    """[N] cosine of each row of a [N, H] with the same row of b."""
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return np.einsum("nh,nh->n", a, b) / np.maximum(na * nb, 1e-300)


def evaluate_similarity(model, data, fca=None, batch_size=64, progress=False) -> dict:
    """Spearman (and Pearson) of the pairs' cosine similarity against the gold scores, the FLOPs ratio to the
    full model on the real tokens, and (with fca) the full model's Spearman and the mean cosine between each
    sentence's FCA and full embeddings. progress: a bar over the sentences embedded (on a terminal only)."""
    if not isinstance(data, Similarity):
        data = read_sts(data)
    passes = 1 if fca is None else 2
    with progress_bar(2 * len(data) * passes, "similarity", None if progress else False) as bar:
        a, b, flops, full = pair_embeddings(model, data, fca, batch_size, bar)
        fa, fb = pair_embeddings(model, data, None, batch_size, bar)[:2] if fca is not None else (a, b)
    sim = cosines(a, b)                                              # [N]
    res = {"model": str(model.path), "data": data.source, "pairs": len(data), "fca": None if fca is None else fca.to_dict(),
           "spearman": spearman(sim, data.scores), "pearson": float(np.corrcoef(sim, data.scores)[0, 1]),
           "flops": flops, "flops_full": full, "flops_ratio": flops / full}
    if fca is not None:
        res["spearman_full"] = spearman(cosines(fa, fb), data.scores)
        res["cosine_to_full"] = float(np.mean(np.concatenate([cosines(a, fa), cosines(b, fb)])))
    return res
