"""Many threads, one model: every public call gives, bit for bit, what it gives when called alone."""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import minifca

TEXTS = ["a gripping, funny and moving film", "the plot is thin and the acting wooden , a long two hours",
         "not bad", "one of the best films of the year, with a score that lifts every scene it is in",
         "dull", "i laughed , i cried , i want my money back"]


@pytest.fixture(scope="module")
def sst2(sst2_path):
    return minifca.from_pretrained(sst2_path, backend="numba")


def test_tokenizer_truncation_is_per_call(sst2):
    """4 threads tokenizing with and without max_length: none sees another's truncation setting.

    With truncation switched on and off around each call on one shared tokenizer this failed 461
    of 1,200 calls (texts cut to another call's limit, or refused as too long for it).
    """
    texts = [" ".join(["word"] * 40)] * 16                           # a batch long enough to be interrupted
    settings = [None, 8, None, 16]
    expect = {m: sst2.tokenize(texts, max_length=m).input_ids for m in settings}

    def job(i):
        m = settings[i % len(settings)]
        return m, sst2.tokenize(texts, max_length=m).input_ids

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)                                      # switch threads as often as possible
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(job, range(600)))
    finally:
        sys.setswitchinterval(interval)
    for m, ids in results:
        np.testing.assert_array_equal(ids, expect[m])
    assert expect[None].shape[1] == 42 and expect[8].shape[1] == 8


def test_eight_threads_every_call_equals_serial(sst2):
    fca = minifca.FCAConfig(keep=0.5)
    fca3 = minifca.FCAConfig(keep=0.34, aggregate="clusters", clusters=2)
    enc = sst2.tokenize(TEXTS)

    calls = [
        ("tokenize", lambda: sst2.tokenize(TEXTS, max_length=10).input_ids),
        ("tokenize_full", lambda: sst2.tokenize(TEXTS).input_ids),
        ("forward", lambda: sst2(enc).logits),
        ("forward_fca", lambda: sst2(enc, fca=fca).logits),
        ("forward_fca_clusters", lambda: sst2(enc, fca=fca3).last_hidden_state),
        ("embed", lambda: sst2.embed(TEXTS, batch_size=4)),
        ("embed_fca", lambda: sst2.embed(TEXTS, fca=fca, max_length=12)),
        ("classify", lambda: np.stack([p for _, p in sst2.classify(TEXTS, batch_size=3)])),
        ("classify_fca", lambda: np.stack([p for _, p in sst2.classify(TEXTS, fca=fca3)])),
    ]
    serial = {name: fn() for name, fn in calls}
    jobs = [calls[i % len(calls)] for i in range(72)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda c: (c[0], c[1]()), jobs))
    for name, value in got:
        np.testing.assert_array_equal(value, serial[name], err_msg=name)
