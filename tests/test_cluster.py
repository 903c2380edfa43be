"""Jobs on a Dask cluster (minifca/cluster.py): the same results as the serial path, bit for bit; a worker killed in
the middle of a grid loses and duplicates nothing; an interrupted client resumes from its output folder; the
model is loaded once per worker; without dask.distributed, --cluster says how to install it.

One 2-worker LocalCluster (worker processes, one thread each) serves the module and is always closed."""
from __future__ import annotations

import csv
import json
import os
import signal
import sys
import time

import numpy as np
import pytest

import minifca
from minifca import ablate as ab, calibrate as cal, cluster, data as D, evaluate as ev
from minifca.cli import main
from minifca.errors import ClusterError

from conftest import SST2_DEV, SST2_MODEL, SST2_TRAIN

pytestmark = pytest.mark.timeout(180)
EXAMPLES, BATCH = 24, 4                               # 6 batches, each one task per configuration
TIMED = ("seconds",)                                  # the only fields that differ from run to run


@pytest.fixture(scope="module")
def model():
    return minifca.from_pretrained(SST2_MODEL, backend="numba")


@pytest.fixture(scope="module")
def data():
    return D.load_data(SST2_DEV, limit=EXAMPLES)


@pytest.fixture(scope="module")
def local2():
    import dask
    # a machine shared by other test runs can take longer than Dask's 30 s to start or reach a worker process
    with dask.config.set({"distributed.comm.timeouts.connect": "120s", "distributed.comm.timeouts.tcp": "120s"}):
        runner = cluster.connect("local:2")
        try:
            runner.client.wait_for_workers(2, timeout=120)
            yield runner
        finally:
            runner.close()


def small_grid():
    return ab.grid(6, ["attention_received", "random"], ["drop", "weighted"], [0.7, 0.4])


@pytest.fixture(scope="module")
def serial_grid(model, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("serial")
    ab.ablate(model, data, small_grid(), out, batch_size=BATCH, log=lambda s: None)
    return out


def csv_rows(folder):
    with open(folder / "results.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k not in TIMED} for r in csv.DictReader(f)]


def untimed(result):
    return {k: v for k, v in result.items() if "second" not in k}


def cached_logits(path):
    return {json.loads(s)["batch"]: json.loads(s)["logits"] for s in path.read_text().splitlines()}


def wait_for_workers(runner, n=2):
    runner.client.wait_for_workers(n, timeout=60)


def test_grid_on_two_workers_is_the_serial_grid_bit_for_bit(model, data, local2, serial_grid, tmp_path):
    ab.ablate(model, data, small_grid(), tmp_path, batch_size=BATCH, log=lambda s: None, runner=local2)
    # every field of every row, in the same order, as written (accuracy, agreement, FLOPs: repr of the float)
    assert csv_rows(tmp_path) == csv_rows(serial_grid)
    assert len(csv_rows(tmp_path)) == 1 + len(small_grid())
    assert (tmp_path / "results.md").read_text() == (serial_grid / "results.md").read_text()
    assert (tmp_path / "tradeoff.png").stat().st_size > 0 and (tmp_path / "tradeoff_padded.png").exists()
    for f in (serial_grid / "cache").glob("*.jsonl"):              # every batch's logits, as the serial run has them
        assert cached_logits(tmp_path / "cache" / f.name) == cached_logits(f)
    # each worker loaded the checkpoint once, though each ran many tasks (9 configurations x 6 batches)
    loads = local2.client.run(cluster.loads)
    assert sum(len(v) for v in loads.values()) >= 1
    for v in loads.values():
        assert v.count((str(model.path), "numba")) <= 1
    # ... and set glibc's malloc thresholds then, although Dask's nanny started it with MALLOC_TRIM_THRESHOLD_
    nanny_env = local2.client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
    malloc = local2.client.run(cluster.malloc_set)
    for addr in loads:
        assert nanny_env[addr] is not None and malloc[addr] == ([True] if loads[addr] else [])


def test_eval_of_several_schedules_and_calibration_match_serial(model, data, local2):
    fcas = [None, minifca.FCAConfig(keep=0.5), minifca.FCAConfig(keep=[1.0, 0.8, 0.6, 0.5, 0.4, 0.3],
                                                                 score="cls_attention")]
    here = ev.evaluate_many(model, data, fcas, batch_size=BATCH)
    there = ev.evaluate_many(model, data, fcas, batch_size=BATCH, runner=local2)
    assert [untimed(r) for r in there] == [untimed(r) for r in here] and there[1]["flops_ratio"] < 1
    sample = data.subset(range(8))                                   # one batch: each candidate is one task
    kw = {"target": 0.6, "step": 0.4, "batch_size": 8, "refine": 1,
          "rules": [cal.parse_rule("cls_attention+weighted")], "log": lambda s: None}
    cfg, best = cal.calibrate(model, sample, **kw)
    cfg2, best2 = cal.calibrate(model, sample, runner=local2, **kw)
    assert cfg2 == cfg
    for k in ("keep", "rule", "agreement", "kl", "flops_ratio"):
        assert best2[k] == best[k], k
    # the refinement looks ahead by the workers' count: never fewer evaluations than the serial search
    assert best2["evaluations"] >= best["evaluations"]


def test_embedding_job_on_two_workers_is_the_serial_job_bit_for_bit(data, local2, minilm_path, tmp_path, capsys):
    from minifca.embedding import embed_file
    corpus = tmp_path / "corpus.txt"
    texts = data.texts + ["", "a short one", data.texts[0] * 3]      # a blank line is a text too
    corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
    m = minifca.from_pretrained(minilm_path, backend="numba")
    kw = {"batch_size": 4, "window": 12, "shard_batches": 2}         # 3 windows of 3 batches, in 2 shards each
    embed_file(m, corpus, tmp_path / "here.npy", **kw)
    embed_file(m, corpus, tmp_path / "there.npy", runner=local2, **kw)
    here, there = np.load(tmp_path / "here.npy"), np.load(tmp_path / "there.npy")
    assert here.shape == (len(texts), m.config.hidden_size) and np.array_equal(there, here)   # every vector, every bit
    # the command line, pointed at the scheduler: the same vectors as the command without --cluster
    for name, extra in (("cli_here.npy", []), ("cli_there.npy", ["--cluster", local2.client.scheduler.address])):
        assert main(["embed", str(corpus), "-o", str(tmp_path / name), "--model", str(minilm_path),
                     "--batch-size", "4", *extra]) == 0
    assert np.array_equal(np.load(tmp_path / "cli_there.npy"), np.load(tmp_path / "cli_here.npy"))
    assert "worker thread(s)" in capsys.readouterr().err


def test_a_worker_killed_mid_grid_loses_and_repeats_nothing(model, data, local2, serial_grid, tmp_path):
    wait_for_workers(local2)
    pids = local2.client.run(os.getpid)
    killed, rows_at_kill = [], []

    def kill_once(line):                                             # after the first row: kill the busiest worker
        if killed:
            return
        busy = max(local2.client.processing().items(), key=lambda kv: len(kv[1]))[0]
        os.kill(pids[busy], signal.SIGKILL)
        killed.append(busy)
        rows_at_kill.append(len(csv_rows(tmp_path)))

    ab.ablate(model, data, small_grid(), tmp_path, batch_size=BATCH, log=kill_once, runner=local2)
    assert killed and rows_at_kill[0] < 1 + len(small_grid())       # it died with the grid unfinished
    rows = csv_rows(tmp_path)
    assert sorted(r["key"] for r in rows) == sorted(r["key"] for r in csv_rows(serial_grid))  # each once
    assert rows == csv_rows(serial_grid)
    for f in (tmp_path / "cache").glob("*.jsonl"):                    # each batch's result written once
        batches = [json.loads(s)["batch"] for s in f.read_text().splitlines()]
        assert sorted(batches) == list(range(EXAMPLES // BATCH))
    wait_for_workers(local2)                                          # the nanny restarted it
    assert set(local2.client.run(os.getpid).values()) != set(pids.values())


def test_an_interrupted_client_resumes_from_its_output_folder(model, data, local2, serial_grid, tmp_path):
    wait_for_workers(local2)
    logs = []

    def stop_after_three(line):
        logs.append(line)
        if len(logs) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ab.ablate(model, data, small_grid(), tmp_path, batch_size=BATCH, log=stop_after_three, runner=local2)
    done_rows = len(csv_rows(tmp_path))
    assert 1 + 3 <= done_rows < 1 + len(small_grid())
    cached = sum(len(f.read_text().splitlines()) for f in (tmp_path / "cache").glob("*.jsonl"))
    deadline = time.monotonic() + 30                                  # the interrupted run's tasks are cancelled
    while local2.client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert local2.client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) == 0

    submitted = []
    real_map = local2.map

    def counting_map(fn, model_, tasks):
        submitted.extend(tasks)
        return real_map(fn, model_, tasks)
    local2.map = counting_map
    try:
        ab.ablate(model, data, small_grid(), tmp_path, batch_size=BATCH, log=logs.append, runner=local2)
    finally:
        del local2.map
    n_batches = EXAMPLES // BATCH
    finished = done_rows - 1                                          # configurations with a row: not run again
    # the rest: every batch of the unfinished configurations but the ones already in the cache
    cached_unfinished = cached - n_batches * done_rows
    assert len(submitted) == n_batches * (len(small_grid()) - finished) - cached_unfinished
    assert sum("done already" in s for s in logs) == finished
    assert csv_rows(tmp_path) == csv_rows(serial_grid)


def test_model_ref_changes_when_the_checkpoint_is_rewritten(tmp_path):
    import shutil
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy(SST2_MODEL / f, tmp_path / f)
    m = minifca.from_pretrained(tmp_path, backend="numpy")
    a = cluster.ModelRef.of(m)
    assert cluster.ModelRef.of(m) == a                                # the same files: the worker's cached model
    os.utime(tmp_path / "model.safetensors", ns=(1, 1))
    assert cluster.ModelRef.of(m) != a                                # rewritten: loaded again


def test_without_distributed_cluster_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(ClusterError, match=r"pip install -e '\.\[distributed\]'"):
        cluster.connect("local:2")


def test_bad_cluster_addresses_are_clear_errors(monkeypatch):
    for spec in ("local:0", "local:two", "local"):
        with pytest.raises(ClusterError, match="local:N"):
            cluster.connect(spec)
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 2)
    with pytest.raises(ClusterError, match=r"no Dask scheduler answered at tcp://127\.0\.0\.1:9.*dask scheduler"):
        cluster.connect("127.0.0.1:9")


def test_serial_runner_runs_in_order():
    seen = list(cluster.Serial().map(lambda m, x: (m, x * 2), "model", [(1,), (2,), (3,)]))
    assert seen == [(0, ("model", 2)), (1, ("model", 4)), (2, ("model", 6))]
    assert np.array_equal(cluster.Serial().share(np.arange(3)), np.arange(3))


# ---------------------------------------------------------------- the command line, pointed at the running scheduler


def test_cli_ablate_eval_calibrate_on_a_scheduler_address(model, data, local2, serial_grid, tmp_path, capsys):
    address = local2.client.scheduler.address                         # `--cluster tcp://host:port`, as after `dask scheduler`
    base = ["--model", str(SST2_MODEL), "--batch-size", str(BATCH), "--cluster", address]
    assert main(["ablate", "--data", str(SST2_DEV), "--limit", str(EXAMPLES), "--keep", "0.7,0.4",
                 "--out", str(tmp_path / "grid"), *base]) == 0
    assert csv_rows(tmp_path / "grid") == csv_rows(serial_grid)      # the defaults are small_grid's rules
    assert "worker thread(s) at " + address in capsys.readouterr().err

    files = []
    for i, fca in enumerate([minifca.FCAConfig(keep=0.5), minifca.FCAConfig(keep=0.3, score="cls_attention")]):
        fca.save(tmp_path / f"s{i}.json")
        files.append(str(tmp_path / f"s{i}.json"))
    assert main(["eval", "--data", str(SST2_DEV), "--limit", str(EXAMPLES), "--schedules", *files, "--json", *base]) == 0
    got = json.loads(capsys.readouterr().out)
    want = ev.evaluate_many(model, data, [minifca.FCAConfig.load(f) for f in files], batch_size=BATCH)
    assert [untimed(r) for r in got] == [untimed(r) for r in json.loads(json.dumps(want))]

    cal_args = ["calibrate", "--data", str(SST2_TRAIN), "--samples", "8", "--descent-samples", "0", "--refine", "0",
                "--target-flops", "0.7", "--step", "0.4", "--model", str(SST2_MODEL), "--batch-size", "8"]
    assert main([*cal_args, "--out", str(tmp_path / "here.json")]) == 0
    assert main([*cal_args, "--out", str(tmp_path / "there.json"), "--cluster", address]) == 0
    here, there = (json.loads((tmp_path / f).read_text()) for f in ("here.json", "there.json"))
    assert there["keep"] == here["keep"] and {**there["meta"], "seconds": 0} == {**here["meta"], "seconds": 0}


def test_cli_cluster_without_distributed_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    assert main(["ablate", "--model", str(SST2_MODEL), "--data", str(SST2_DEV), "--limit", "4", "--out",
                 str(tmp_path), "--cluster", "local:2"]) == 2
    err = capsys.readouterr().err
    assert "pip install -e '.[distributed]'" in err and "Traceback" not in err
