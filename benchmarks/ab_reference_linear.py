"""The reference's `linear` as one 2-D product against `x @ w.T` on [B, n, in] (B small products), whole
numpy-backend forwards, alternating, medians of 5; random MiniLM-L6-shaped checkpoint from `minifca bench`.
Usage, from the repository root: python benchmarks/ab_reference_linear.py
"""
import minifca
from minifca import bench, reference as R

model = minifca.from_pretrained("weights/bench/minilm-l6", backend="numpy")
flat = R.linear


def stacked(x, w, b):
    return x @ w.T + b


for B, L in [(1, 128), (8, 128), (32, 64)]:
    ids = bench.random_ids(B, L, model.config.vocab_size)
    ms = {"x @ w.T": [], "one 2-D product": []}
    for _ in range(2):
        for name, f in (("x @ w.T", stacked), ("one 2-D product", flat)):
            R.linear = f
            ms[name].append(bench.median_ms(lambda: model.forward(ids), 5))
    R.linear = flat
    print(f"{B}x{L}: " + ", ".join(f"{k} {' / '.join(f'{v:.1f}' for v in vs)} ms" for k, vs in ms.items()), flush=True)
