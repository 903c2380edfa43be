"""`minifca bench`: our backends beside torch and ONNX Runtime (CPU), or numba.cuda beside torch CUDA (GPU)."""
from __future__ import annotations

import argparse

from .. import bench, bench_cuda
from .common import add_json, emit, int_at_least


def cmd_bench(args):
    if "cuda" in args.backends:
        res = bench_cuda.run_bench_cuda(bench.QUICK_MODELS if args.quick else bench.MODELS,
                                        bench.QUICK_SHAPES if args.quick else bench.SHAPES,
                                        runs=args.runs or (2 if args.quick else 20), fca_targets=bench.FCA_TARGETS,
                                        root=args.weights)
        if not emit(res, args.json):
            bench_cuda.print_bench_cuda(res)
        args.backends = [b for b in args.backends if b != "cuda"]
        if not args.backends:
            return
    res = bench.run_bench(backends=args.backends, quick=args.quick, runs=args.runs, threads=args.threads,
                          root=args.weights, first_output_model=args.model, profile=args.profile)
    if not emit(res, args.json):
        bench.print_report(res)


def register(subparsers, parents):
    p = subparsers.add_parser("bench", help="time our backends beside torch and ONNX Runtime (CPU), with FCA",
                              description=bench.__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", dest="backends", nargs="+", default=["numba", "numpy"], choices=["numba", "numpy", "cuda"],
                   help="our backends to time (default: numba numpy); cuda = numba.cuda vs torch CUDA on a GPU")
    p.add_argument("--quick", action="store_true", help="a tiny random model at tiny shapes (a smoke test)")
    p.add_argument("--runs", type=int_at_least(1), default=None, help="rounds of turns (one timed forward per engine and case each) after warm-up (default 5; 2 with --quick)")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="threads for every engine (default: all cores)")
    p.add_argument("--weights", default="weights/bench", help="where the random checkpoints go (default weights/bench)")
    p.add_argument("--model", default=None, help="checkpoint for the time-to-first-output test (default all-MiniLM-L6-v2)")
    p.add_argument("--profile", action="store_true", help="also time each op of the numba forward (ms per forward)")
    add_json(p)
    p.set_defaults(func=cmd_bench)
