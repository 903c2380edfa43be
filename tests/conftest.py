"""Shared fixtures: where the assets are, and random-weight checkpoints written by transformers."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

from minifca.assets import shared_path
from minifca.data import load_data

ROOT = Path(__file__).resolve().parents[1]
SHARED = shared_path()
SST2_MODEL, SST2_DEV, SST2_TRAIN = shared_path("sst2_model"), shared_path("sst2_dev"), shared_path("sst2_train")

# Hypothesis: under CI (CI=true) a fixed, derandomized profile, so a run is reproducible; locally the same
# tests draw fresh examples every run (pass --hypothesis-seed=N to replay one).
settings.register_profile("ci", deadline=None, max_examples=15, derandomize=True, database=None,
                          print_blob=True)
settings.register_profile("dev", deadline=None, max_examples=15, database=None, print_blob=True)
IN_CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if IN_CI else "dev"))

EPS32 = float(np.finfo(np.float32).eps)   # 2**-23, twice float32's unit roundoff u


def f32_bound(ref, depth=1, width=1):
    """The largest |fast - reference| that float32 rounding alone explains, for the same math done in another order.

    A float32 sum of w terms is within γ_w ≈ w·u of the exact sum, relative to the sum of its terms'
    magnitudes (Higham, "Accuracy and Stability of Numerical Algorithms", §3.1); two implementations that
    add in different orders (BLAS blocking, Numba loops, float64 accumulators) are therefore within
    2·w·u = w·eps of each other per reduction. `width` is the widest reduction feeding the values compared
    (hidden or intermediate size, or sequence length for attention). LayerNorm brings every layer's output
    back to unit scale, so the per-layer errors add rather than compound: `depth` counts the chained
    reductions/layers (embeddings' LayerNorm included). The bound is relative to the largest magnitude
    compared, floored at 1 because LayerNorm outputs and probabilities are O(1) while the sums that made
    them (attention logits, pre-LayerNorm residuals) are not smaller than that.
    """
    scale = max(1.0, float(np.abs(np.asarray(ref, np.float64)).max(initial=0.0)))
    return depth * width * EPS32 * scale


def model_bound(ref, cfg, extra_depth=0):
    """f32_bound for a whole BERT forward: one reduction chain per layer plus the embeddings, widest sum max(H, I)."""
    return f32_bound(ref, depth=cfg.num_hidden_layers + 1 + extra_depth,
                     width=max(cfg.hidden_size, cfg.intermediate_size))


def max_abs_diff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max(initial=0.0))


def assert_f32_close(got, ref, depth=1, width=1, what="values"):
    """got == ref up to float32 rounding of `depth` chained reductions of width `width` (see f32_bound)."""
    diff, bound = max_abs_diff(got, ref), f32_bound(ref, depth, width)
    assert diff <= bound, f"{what}: max |diff| {diff:.3g} > float32 bound {bound:.3g} (depth {depth}, width {width})"


def read_sst2(path, limit=None):
    """(sentences, labels) of a GLUE SST-2 TSV (header `sentence<TAB>label`), the first `limit` rows."""
    data = load_data(path, limit=limit)
    return data.texts, np.array(data.labels)


def write_random_checkpoint(folder, seed=0, dtype="float32", max_shard_size=None, head="classifier", **shape):
    """minifca.bench.write_random_checkpoint with the tests' defaults: a classifier head, every parameter
    perturbed (so every tensor matters). shape: any BertConfig fields (hidden_size, num_hidden_layers, ...)."""
    from minifca.bench import write_random_checkpoint as write
    return write(folder, seed=seed, head=head, perturb=0.02, dtype=dtype, max_shard_size=max_shard_size, **shape)


def torch_reference(folder, head="classifier"):
    """The transformers model of a checkpoint folder, in float32, eval mode."""
    import torch
    import transformers
    cls = {"classifier": transformers.BertForSequenceClassification, "mlm": transformers.BertForMaskedLM,
           "token": transformers.BertForTokenClassification, None: transformers.BertModel}[head]
    return cls.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def minilm_path():
    import minifca
    return minifca.default_model_path()


@pytest.fixture(scope="module")
def minilm(minilm_path):
    """all-MiniLM-L6-v2 on the default backend, loaded once per test module (a module may define its own)."""
    import minifca
    return minifca.from_pretrained(minilm_path)


@pytest.fixture(scope="session")
def sst2_path():
    assert SST2_MODEL.is_dir(), f"shared SST-2 checkpoint missing at {SST2_MODEL}"
    return SST2_MODEL


@pytest.fixture
def new_rules():
    """A scoring rule and an aggregation rule added as a built-in one is: each registered in one place, its
    facts with it. No table of the fast paths names them. Removed again afterwards."""
    from minifca import fca

    @fca.register_score("received_minus_cls", batched=True)
    def received_minus_cls(stats, x, keys, rng):
        """Attention received, less what [CLS] alone pays (scores a sequence [n] or a batch [B, n])."""
        return stats["received"] - stats["cls"]

    @fca.register_aggregate("size_chunks", coarse_units="clusters", weights="sizes", batched=True)
    def size_chunks(scores, sizes, keys, c):
        """U cut into c contiguous chunks by position (as `clusters`), each the size-weighted mean of its members."""
        groups, _ = fca.clusters(scores, sizes, keys, c)
        return groups, fca._normalise_in_groups(groups, sizes.astype(np.float64))

    yield "received_minus_cls", "size_chunks"
    for table in (fca.SCORES, fca.SCORE_FACTS, fca.AGGREGATES, fca.AGGREGATE_FACTS):
        table.pop("received_minus_cls", None), table.pop("size_chunks", None)
