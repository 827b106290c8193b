"""Matrix-product speed on this CPU in float32 and bfloat16 (why specchat computes in fp32 on CPUs).

    .venv/bin/python benchmarks/cpu_matmul.py
"""

import time

import torch

for dtype in (torch.float32, torch.bfloat16):
    weight = torch.randn(1536, 8960, dtype=dtype)
    for tokens in (1, 16, 256):
        x = torch.randn(tokens, 1536, dtype=dtype)
        x @ weight
        start = time.perf_counter()
        repeats = 3
        for _ in range(repeats):
            x @ weight
        seconds = (time.perf_counter() - start) / repeats
        print(f"{str(dtype):15} tokens {tokens:4d}: {seconds * 1e3:8.2f} ms, {2 * tokens * 1536 * 8960 / seconds / 1e9:6.1f} GFLOP/s")
