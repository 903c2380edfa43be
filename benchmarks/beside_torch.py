"""minifca and torch in one process: does either slow the other down? Every case in a fresh subprocess.

Cases, for each threading layer asked for (--layers; `default` is what minifca picks, `omp` is
NUMBA_THREADING_LAYER=omp, the layer minifca ran on before it preferred TBB):
  alone          minifca's numba forward alone;
  torch alone    transformers' BertModel forward alone (torch's defaults, as users run it);
  torch first    torch imported and used first, then minifca, then torch again;
  minifca first  minifca imported and used first, then torch, then minifca again.
Each forward is timed `--runs` times after two warm-up calls: wall-clock median and best, and the CPU time the
whole process used per forward (all threads; threads that spin while waiting show up there even when the
machine is shared and the wall clock is noisy). Ratios are against the `alone` cases of the same round and layer.
Also printed per case: Numba's threading layer and the OpenMP/BLAS runtimes loaded (threadpoolctl).

Random-weight checkpoints from `minifca bench` (weights/bench/<model>, written there if missing).
Usage, from the repository root:
    python benchmarks/beside_torch.py [--model minilm-l6] [--shape 8x128] [--runs 10] [--rounds 2] [--layers default,omp]
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r'''
import json, os, sys, time
case, folder, B, L, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])


def clock(fn):
    for _ in range(2):
        fn()
    wall, cpu = [], []
    for _ in range(runs):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    wall.sort()
    return {"median": 1e3 * wall[len(wall) // 2], "best": 1e3 * wall[0], "cpu": 1e3 * sum(cpu) / len(cpu)}


def torch_forward():
    import torch, transformers
    model = transformers.BertModel.from_pretrained(folder).eval()
    ids = torch.randint(1000, model.config.vocab_size, (B, L), generator=torch.Generator().manual_seed(0))
    def run():
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return run


def minifca_forward():
    import minifca
    from minifca import bench
    model = minifca.from_pretrained(folder, backend="numba")
    ids = bench.random_ids(B, L, model.config.vocab_size)
    return lambda: model.forward(ids)


out = {}
if case == "alone":
    out["minifca"] = clock(minifca_forward())
elif case == "torch alone":
    out["torch"] = clock(torch_forward())
elif case == "torch first":
    t = torch_forward()
    out["torch"] = clock(t)
    out["minifca"] = clock(minifca_forward())
    out["torch again"] = clock(t)
elif case == "minifca first":
    m = minifca_forward()
    out["minifca"] = clock(m)
    out["torch"] = clock(torch_forward())
    out["minifca again"] = clock(m)
import numba, threadpoolctl
try:
    out["layer"] = numba.threading_layer()
except ValueError:
    out["layer"] = "-"
out["runtimes"] = sorted(f"{i['internal_api']}:{os.path.basename(i['filepath'])}" for i in threadpoolctl.threadpool_info())
print(json.dumps(out))
'''

CASES = ("alone", "torch alone", "torch first", "minifca first")


def run_case(case, folder, B, L, runs, layer):
    env = dict(os.environ)
    if layer != "default":
        env["NUMBA_THREADING_LAYER"] = layer
    r = subprocess.run([sys.executable, "-c", CHILD, case, str(folder), str(B), str(L), str(runs)], env=env,
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{case} ({layer}) failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def fmt(t):
    return f"{t['median']:8.1f} {t['best']:8.1f} {t['cpu']:8.1f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--shape", default="8x128")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--layers", default="default,omp")
    ap.add_argument("--cases", default=",".join(CASES), help="a subset of: " + ", ".join(CASES))
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from minifca import bench
    folder = bench.ensure_checkpoint(Path("weights/bench"), a.model, bench.MODELS[a.model])
    B, L = map(int, a.shape.split("x"))
    print(f"{a.model} {B}x{L}, {a.runs} runs per figure, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start")
    print(f"{'round':5s} {'layer':9s} {'case':14s} {'engine':14s} {'median':>8s} {'best':>8s} {'cpu/fwd':>8s}"
          f" {'x alone (median, best, cpu)':>28s}  layer used, runtimes")
    for rnd in range(1, a.rounds + 1):
        for layer in a.layers.split(","):
            cases = [c for c in CASES if c in a.cases.split(",")]
            res = {case: run_case(case, folder, B, L, a.runs, layer) for case in cases}
            alone = {"minifca": res.get("alone", {}).get("minifca"), "torch": res.get("torch alone", {}).get("torch")}
            for case in cases:
                r = res[case]
                for engine in ("minifca", "torch", "torch again", "minifca again"):
                    if engine not in r:
                        continue
                    t, base = r[engine], alone[engine.split()[0]]
                    ratio = " ".join(f"{t[k] / base[k]:5.2f}x" for k in ("median", "best", "cpu")) if base else ""
                    print(f"{rnd:<5d} {layer:9s} {case:14s} {engine:14s} {fmt(t)} {ratio:>28s}  "
                          f"{r['layer']}, {' '.join(r['runtimes'])}", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
