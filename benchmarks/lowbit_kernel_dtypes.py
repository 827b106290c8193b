"""Milliseconds per product of torch's int4 and int8 weight-only CPU kernels, given float32 rows
and scales against bf16 ones, beside a dense float32 product (the demo target's 8960x1536 MLP
shape; specchat.weights.lowbit.kernel_dtype picks bf16 from what this prints).

    .venv/bin/python benchmarks/lowbit_kernel_dtypes.py
"""

from __future__ import annotations

import statistics
import time

import torch

OUT, IN, GROUP = 8960, 1536, 32


def milliseconds(work, repeats: int = 7) -> float:
    work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {OUT}x{IN}, int4 groups of {GROUP}")
    packed = torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (OUT, IN), dtype=torch.int32), 1)
    q8 = torch.randint(-127, 128, (OUT, IN), dtype=torch.int8)
    dense = torch.randn(OUT, IN)
    print("rows  rows/scales in   int4 ms   int8 ms   dense float32 ms")
    for rows in (1, 8, 32):
        x = torch.randn(rows, IN)
        for dtype in (torch.float32, torch.bfloat16):
            xs, scales_zeros, scales = x.to(dtype), torch.rand(IN // GROUP, OUT, 2).to(dtype), torch.rand(OUT).to(dtype)
            int4 = milliseconds(lambda: torch._weight_int4pack_mm_for_cpu(xs, packed, GROUP, scales_zeros))
            int8 = milliseconds(lambda: torch._weight_int8pack_mm(xs, q8, scales))
            print(f"{rows:4d}  {str(dtype)[6:]:>14}  {int4:8.2f}  {int8:8.2f}  {milliseconds(lambda: x @ dense.T):8.2f}", flush=True)


if __name__ == "__main__":
    main()
