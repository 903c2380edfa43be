"""The threading configuration minifca/_process.py chooses (not timings: benchmarks/beside_torch.py measures those).

Numba's loops run on TBB, not on an OpenMP runtime, whether torch was imported before or after minifca, so
no other library's runtime (and no wait policy read before minifca loaded) can take over the Numba pool, and
minifca leaves OMP_WAIT_POLICY alone for torch's runtime; calls from several Python threads at once give the
results of the same calls made one by one.
"""
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import minifca

from conftest import assert_f32_close, write_random_checkpoint

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 120,
            "max_position_embeddings": 32}

# run in a fresh process: torch (imported and used) and minifca in the order given, then report what is loaded
PROBE = r"""
import json, os, sys
import numpy as np

def use_torch():
    import torch
    torch.set_num_threads(2)
    a = torch.ones(256, 256)
    (a @ a).sum().item()
    torch.nn.functional.gelu(torch.ones(64, 4096)).sum().item()    # a parallel region in torch's OpenMP runtime

def use_minifca():
    import minifca
    model = minifca.from_pretrained(sys.argv[1], backend="numba")
    model.forward(np.arange(3, 3 + 2 * 12).reshape(2, 12))

for step in sys.argv[2].split(","):
    {"torch": use_torch, "minifca": use_minifca}[step]()
import numba, threadpoolctl
print(json.dumps({"layer": numba.threading_layer(), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                  "openmp": sorted(i["filepath"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "openmp")}))
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("process") / "tiny", seed=5, **TINY)


def probe(folder, order, **env):
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "NUMBA_THREADING_LAYER")}
    r = subprocess.run([sys.executable, "-c", PROBE, str(folder), order], env={**base, **env}, capture_output=True,
                       text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("order", ["torch,minifca", "minifca,torch"])
def test_numba_runs_on_tbb_beside_torch(tiny, order):
    """Either order: Numba's layer is TBB, the only OpenMP runtime loaded is torch's own (Numba's `omp` layer
    would have bound torch's libgomp, or loaded a second one), and minifca set no OMP_WAIT_POLICY for it."""
    import torch
    got = probe(tiny, order)
    assert got["layer"] == "tbb"
    assert got["OMP_WAIT_POLICY"] is None
    torch_lib = os.path.realpath(os.path.join(os.path.dirname(torch.__file__), "lib"))
    assert len(got["openmp"]) == 1 and os.path.realpath(got["openmp"][0]).startswith(torch_lib), got["openmp"]


def test_numba_threading_layer_chosen_by_the_user_is_kept(tiny):
    """NUMBA_THREADING_LAYER wins; on GNU OpenMP minifca asks for idle threads to sleep (its earlier default)."""
    got = probe(tiny, "minifca", NUMBA_THREADING_LAYER="omp")
    assert got["layer"] == "omp" and got["OMP_WAIT_POLICY"] == "PASSIVE"
    got = probe(tiny, "minifca", NUMBA_THREADING_LAYER="omp", OMP_WAIT_POLICY="ACTIVE")
    assert got["layer"] == "omp" and got["OMP_WAIT_POLICY"] == "ACTIVE"


def test_libtbb_is_found_from_the_wheel():
    from minifca import _process
    path = _process.load_tbb()
    assert path is not None and os.path.basename(path) == _process.TBB_LIBRARY[sys.platform]


def test_concurrent_calls_from_threads_match_calls_one_by_one(tiny):
    """Six Python threads call the numba forward at once (released together by a barrier), three times each:
    no abort (Numba's workqueue layer aborts on concurrent parallel calls), and each result is the one the same
    call gives alone."""
    model = minifca.from_pretrained(tiny, backend="numba")
    rng = np.random.default_rng(0)
    inputs = [rng.integers(3, TINY["vocab_size"], (1 + i % 3, 8 + 2 * i)) for i in range(6)]
    alone = [model.forward(ids).last_hidden_state for ids in inputs]
    import numba
    assert numba.threading_layer() == "tbb"
    barrier, got, errors = threading.Barrier(len(inputs)), {}, []

    def call(i):
        try:
            barrier.wait()
            got[i] = [model.forward(inputs[i]).last_hidden_state for _ in range(3)]
        except BaseException as e:      # noqa: BLE001  (reported below, from the test's thread)
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, ref in enumerate(alone):
        for out in got[i]:
            # same math, same kernels: only BLAS's blocking may differ with how many of its threads were free
            assert_f32_close(out, ref, depth=TINY["num_hidden_layers"] + 1, width=TINY["intermediate_size"],
                             what=f"thread {i}")
