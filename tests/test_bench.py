"""`minifca bench --quick`: the whole benchmark on a tiny random model, checked for shape and sense."""
from __future__ import annotations

import json

import pytest

from minifca import bench
from minifca.cli import main


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory, sst2_path):
    root = tmp_path_factory.mktemp("bench")
    return bench.run_bench(backends=("numba",), quick=True, runs=1, threads=1, root=root,
                           first_output_model=sst2_path), root


def test_quick_bench_reports_every_engine_and_figure(quick_result):
    res, root = quick_result
    assert (root / "tiny" / "model.safetensors").is_file() and (root / "tiny" / "model.onnx").is_file()
    assert res["machine"]["sgemm_gflops"] > 0 and res["machine"]["threads"] == 1
    each = res["machine"]["sgemm_gflops_each"]                       # before and after the engines: the better
    assert len(each) == 2 and res["machine"]["sgemm_gflops"] == max(each)
    assert res["engines"] == ["numba", "torch", "onnxruntime"]
    entry = res["models"]["tiny"]
    assert set(entry["shapes"]) == {f"{B}x{L}" for B, L in bench.QUICK_SHAPES}
    for row in entry["shapes"].values():
        assert row["flops"] > 0
        r = row["numba"]
        assert r["ms"] > 0 and r["gflops"] > 0 and r["peak_fraction"] == r["gflops"] / max(each)
        assert r["speedup_vs_torch"] > 0 and r["speedup_vs_onnxruntime"] > 0
        for name, target in bench.FCA_TARGETS.items():
            f = r[f"fca_{name}"]
            assert 0 < f["keep"] < 1 and target <= f["flops_ratio"] < 1 and f["speedup"] > 0
        assert "ms" in row["torch"] and "ms" in row["onnxruntime"]
    rss = entry["rss"]["numba"]
    assert rss["peak_rss"] >= rss["rss_after_imports"] > 0
    assert 0 < res["first_output_seconds"] < 60


def test_bench_names_the_blas_kernel_and_warns_of_an_override(quick_result, capsys):
    """The BLAS library, version and kernel threadpoolctl reports, in the result and the printed report; a warning
    when OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE is set (made from a result here: the tests leave the environment alone)."""
    import os

    from threadpoolctl import threadpool_info
    res, _ = quick_result
    blas = res["machine"]["blas"]
    loaded = [i for i in threadpool_info() if i["user_api"] == "blas"]
    named = [(b["library"], b["version"]) for b in blas["libraries"]]  # those loaded when the bench began (a
    assert named and set(named) <= {(i["internal_api"], i["version"]) for i in loaded}  # later import may add more)
    assert all(b["kernel"] for b in blas["libraries"] if b["library"] == "openblas")
    assert blas["overrides"] == {k: os.environ[k] for k in bench.BLAS_OVERRIDES if k in os.environ}
    bench.print_report(res)
    out = capsys.readouterr().out
    for b in blas["libraries"]:
        assert f"{b['library']} {b['version']} ({b['kernel']} kernel" in out
    assert ("warning: OPENBLAS_CORETYPE" in out) == ("OPENBLAS_CORETYPE" in blas["overrides"])
    forced = {**res, "machine": {**res["machine"], "blas": {**blas, "overrides": {"OPENBLAS_CORETYPE": "Haswell"}}}}
    bench.print_report(forced)
    out = capsys.readouterr().out
    assert "warning: OPENBLAS_CORETYPE=Haswell is set" in out and "env -u OPENBLAS_CORETYPE minifca bench" in out
    assert bench.override_warning({"libraries": [], "overrides": {}}) is None


def test_bench_cli_json(tmp_path, capsys, monkeypatch):
    calls = {}

    def fake_run_bench(**kw):
        calls.update(kw)
        return {"machine": {}, "models": {}}
    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    assert main(["bench", "--quick", "--json", "--backend", "numpy", "--runs", "3", "--weights", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out) == {"machine": {}, "models": {}}
    assert calls["backends"] == ["numpy"] and calls["quick"] and calls["runs"] == 3
    assert calls["root"] == str(tmp_path) and calls["profile"] is False


def test_fca_keep_search_meets_target(sst2_path):
    import minifca
    model = minifca.from_pretrained(sst2_path, backend="numba")
    keep, ratio = bench.fca_keep_for(model, 32, 0.5)
    assert ratio >= 0.5
    k = round(keep * 32)
    if k > 1:  # one fewer kept token falls under the target
        out = model.forward(bench.random_ids(1, 32, model.config.vocab_size), fca=minifca.FCAConfig(keep=(k - 1) / 32))
        assert out.flops / out.flops_full < 0.5


def test_profile_splits_the_numba_forward(quick_result):
    """--profile: per-op milliseconds that add up to no more than the forward they were taken from."""
    _, root = quick_result
    prof = bench.subprocess_json("profile", {"folder": str(root / "tiny"), "shapes": [[2, 16]], "runs": 2,
                                             "threads": 1}, 1)
    assert set(prof) == {"2x16 full", "2x16 fca_half"}
    for case, ops in prof.items():
        assert ops["total"] > 0 and {"_linear", "_attend", "ffn", "add_layer_norm", "embeddings"} <= set(ops)
        inner = ops["embeddings"] + ops["add_layer_norm"] + ops["ffn"] + ops["_attend"] + ops.get("fca_reduce", 0)
        assert inner <= ops["total"] * 1.01, case
    assert prof["2x16 fca_half"]["fca_reduce"] > 0 and "fca_reduce" not in prof["2x16 full"]


def test_engines_take_turns_one_forward_at_a_time(quick_result, monkeypatch):
    """`interleaved`: every engine in its own process, timed case by case, one forward each in turn, the order
    rotating from round to round; an engine whose process fails is reported, and the others are still timed."""
    _, root = quick_result
    spec = {"folder": str(root / "tiny"), "shapes": [[1, 8]], "threads": 1, "fca": {"half": 0.5}}
    calls, timed = [], bench.Engine.time
    monkeypatch.setattr(bench.Engine, "time", lambda self, case: calls.append((self.name, case)) or timed(self, case))
    out = bench.interleaved({"numba": spec | {"engine": "numba"}, "numpy": spec | {"engine": "numpy"},
                             "torch": spec | {"engine": "torch", "folder": str(root / "missing")}}, 1, 2)
    assert "exited" in out["torch"]["error"]
    assert calls == [("numba", "1x8"), ("numpy", "1x8"), ("numba", "1x8 fca_half"), ("numpy", "1x8 fca_half"),
                     ("numpy", "1x8"), ("numba", "1x8"), ("numpy", "1x8 fca_half"), ("numba", "1x8 fca_half")]
    for e in ("numba", "numpy"):
        row = out[e]["shapes"]["1x8"]
        assert row["ms"] > 0 and row["fca_half"]["ms"] > 0 and row["fca_half"]["flops_ratio"] >= 0.5
