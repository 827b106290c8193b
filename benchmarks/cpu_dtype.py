"""Decoder-sized products on this CPU per compute dtype and layout (what ``--dtype auto`` and
:class:`specchat.model.cpulinear.WeightLeftLinear` rely on).

    .venv/bin/python benchmarks/cpu_dtype.py [--rows 1,2,4,16,64,128,256,512]

Per (out, in) matrix of the demo target and row count N: milliseconds of x W^T
(``standard``, x (N, in) on the left) and of W x^T (``weight-left``), float32 and bfloat16,
the best of several repeats on all torch threads.  The CPU's bf16 flags are printed first.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from specchat.weights.precision import BF16_CPU_FLAGS, cpu_flags


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1,2,4,16,64,128,256,512")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    flags = cpu_flags()
    print(f"threads {torch.get_num_threads()}; bf16 flags: {[f for f in BF16_CPU_FLAGS if f in flags] or 'none'}")
    print("| matrix | rows | fp32 standard | fp32 weight-left | bf16 standard | bf16 weight-left | best bf16 / best fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for out_features, in_features in ((8960, 1536), (1536, 8960), (1536, 1536)):
        weights = {dtype: torch.randn(out_features, in_features).to(dtype) for dtype in (torch.float32, torch.bfloat16)}
        for rows in (int(r) for r in args.rows.split(",")):
            cells = []
            for dtype, weight in weights.items():
                x = torch.randn(rows, in_features).to(dtype)
                cells.append(best_ms(lambda: F.linear(x, weight), args.repeats))
                cells.append(best_ms(lambda: torch.mm(weight, x.t()).t().contiguous(), args.repeats))
            ratio = min(cells[2:]) / min(cells[:2])
            print(f"| {out_features}x{in_features} | {rows} | " + " | ".join(f"{c:.2f}" for c in cells) + f" | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
