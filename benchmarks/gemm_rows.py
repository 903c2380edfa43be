"""x @ w^T + b against (w @ x^T)^T + b (the transposed copy included) through NumPy's BLAS, by row count.

Usage: python benchmarks/gemm_rows.py   (best of 20 per case; the weight shapes of MiniLM-L6 and bert-base)
With torch importable, also torch.nn.functional.linear (same threads) against NumPy's best form.
"""
import numpy as np

from minifca.bench import best_ms


def x_wt(x, w, b):
    y = np.matmul(x, w.T)
    y += b
    return y


def w_xt(x, w, b):
    return np.add(np.matmul(w, x.T).T, b, out=np.empty((x.shape[0], w.shape[0]), np.float32))


def main():
    try:
        import torch
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    for R in (1, 8, 32, 64, 80, 96, 128, 256, 1024):
        ratios, vs_torch = [], []
        for i, o in [(384, 1152), (384, 1536), (1536, 384), (768, 2304), (768, 3072), (3072, 768)]:
            x, w = rng.normal(size=(R, i)).astype(np.float32), rng.normal(size=(o, i)).astype(np.float32)
            b = rng.normal(size=o).astype(np.float32)
            a = best_ms(lambda x=x, w=w, b=b: x_wt(x, w, b), 20)
            c = best_ms(lambda x=x, w=w, b=b: w_xt(x, w, b), 20)
            ratios.append(a / c)
            if torch is not None:
                tx, tw, tb = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)
                with torch.inference_mode():
                    vs_torch.append(best_ms(lambda t=(tx, tw, tb): torch.nn.functional.linear(*t), 20) / min(a, c))
        line = (f"rows {R:5d}: (x @ w^T time) / (w @ x^T time) over 6 weight shapes: "
                f"{min(ratios):.2f}-{max(ratios):.2f}, mean {np.mean(ratios):.2f}")
        if vs_torch:
            line += f"; torch time / NumPy's best: {min(vs_torch):.2f}-{max(vs_torch):.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
