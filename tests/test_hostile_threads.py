"""Many threads, one model: every public call gives, bit for bit, what it gives when called alone."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import minifca

from conftest import ROOT

TEXTS = ["a gripping, funny and moving film", "the plot is thin and the acting wooden , a long two hours",
         "not bad", "one of the best films of the year, with a score that lifts every scene it is in",
         "dull", "i laughed , i cried , i want my money back"]


@pytest.fixture(scope="module")
def sst2(sst2_path):
    return minifca.from_pretrained(sst2_path, backend="numba")


def test_tokenizer_truncation_is_per_call(sst2):
    """4 threads tokenizing with and without max_length: none sees another's truncation setting.

    Switching truncation on and off around each call on the shared tokenizer without a lock failed 461
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


def test_threads_on_numbas_workqueue_layer(sst2_path):
    """Where Numba has no OpenMP/TBB runtime it uses `workqueue`, which aborted the process (SIGABRT,
    "Concurrent access has been detected") when two threads ran a forward at once: now they take turns."""
    code = textwrap.dedent(f"""
        import numba, minifca
        from concurrent.futures import ThreadPoolExecutor
        m = minifca.from_pretrained({str(sst2_path)!r}, backend="numba")
        enc = m.tokenize(["a fine film with a long sentence in it"] * 4)
        ref = m(enc).logits
        with ThreadPoolExecutor(4) as pool:
            same = all((r == ref).all() for r in pool.map(lambda i: m(enc).logits, range(24)))
        print(numba.threading_layer(), same)
    """)
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-800:]
    assert r.stdout.split() == ["workqueue", "True"]
