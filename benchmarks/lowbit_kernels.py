"""Milliseconds per product of the demo target's MLP shapes: bf16 against the low-bit kernels a
self draft could use (specchat.weights.lowbit's int8 and int4, and torch.ao's dynamic int8).

    .venv/bin/python benchmarks/lowbit_kernels.py
"""

from __future__ import annotations

import copy
import time
import warnings

import torch
from torch import nn

from specchat.weights.lowbit import Int4Linear, Int8Linear

ROWS = (1, 2, 8, 16, 32, 64, 128)


def milliseconds(function, x: torch.Tensor, repeats: int = 40) -> float:
    for _ in range(3):
        function(x)
    started = time.perf_counter()
    for _ in range(repeats):
        function(x)
    return (time.perf_counter() - started) / repeats * 1e3


def main() -> None:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("matrix      rows   bf16   int8   int4  dyn-int8(fp32 in)")
    for out_features, in_features in ((8960, 1536), (1536, 8960)):
        linear = nn.Linear(in_features, out_features, bias=False)
        dense = copy.deepcopy(linear).to(torch.bfloat16)
        int8, int4 = Int8Linear.quantize(dense), Int4Linear.quantize(dense)
        dynamic = quantize_dynamic(nn.Sequential(copy.deepcopy(linear)), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
        with torch.no_grad():
            for rows in ROWS:
                x = torch.randn(rows, in_features, dtype=torch.bfloat16)
                times = [milliseconds(m, x) for m in (dense, int8, int4)] + [milliseconds(dynamic, x.float())]
                print(f"{out_features}x{in_features} {rows:4d} " + " ".join(f"{t:6.2f}" for t in times), flush=True)


if __name__ == "__main__":
    main()
