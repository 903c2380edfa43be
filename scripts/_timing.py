"""The scripts' shared clock: best wall-clock ms of n calls after one warm-up call.

(`minifca.bench.median_ms` gives medians for the benchmark; these scratch measurements report the best.)
"""
import time


def best_ms(f, n):
    f()
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best * 1e3
