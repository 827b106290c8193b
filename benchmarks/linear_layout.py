"""nn.Linear (x W^T) against the weight-left product (W x^T)^T on this CPU, per row count.

    .venv/bin/python benchmarks/linear_layout.py

Why specchat switches its CPU linears to `specchat.model.cpulinear.WeightLeftLinear`.
"""

import time

import torch
import torch.nn.functional as F

from specchat.model.cpulinear import WeightLeftLinear


def best_ms(fn, repeats: int = 8) -> float:
    fn()
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


for out_features, in_features in ((8960, 1536), (1536, 8960)):
    layer = WeightLeftLinear(in_features, out_features, bias=False)
    with torch.no_grad():
        for rows in (1, 16, 64, 256, 1024):
            x = torch.randn(1, rows, in_features)
            standard = best_ms(lambda: F.linear(x, layer.weight))
            left = best_ms(lambda: layer(x))
            print(f"{out_features}x{in_features} rows {rows:5d}: standard {standard:8.2f} ms, weight-left {left:8.2f} ms, x{standard / left:.2f}")
