"""One target pass against the tree size with the target resident in RAM, per compute dtype.

    .venv/bin/python benchmarks/resident_pass_time.py --model demo --dtypes float32,bfloat16 --sizes 1,16,64,256

A 64-token prompt is cached first; each pass then verifies SIZE tokens over it (the best of
``--repeats``).  Where a pass of 64 tokens costs about what one token costs, a resident
target is in the regime speculative decoding needs.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from specchat.app.config import RunConfig
from specchat.model.lm import causal_visibility
from specchat.app.loader import load_pipeline


def pass_seconds(target, size: int, repeats: int) -> float:
    prefix = torch.randint(0, 1000, (64,))
    cache = target.new_cache()
    target.forward(prefix, torch.arange(64), causal_visibility(0, 64), cache, logit_rows=torch.tensor([63]))
    ids = torch.randint(0, 1000, (size,))
    times = []
    for _ in range(repeats + 1):  # the first warms up
        cache.crop(64)
        start = time.perf_counter()
        target.forward(ids, torch.arange(64, 64 + size), causal_visibility(64, size), cache)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--sizes", default="1,16,64,256")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {}
    for dtype in args.dtypes.split(","):
        pipeline = load_pipeline(RunConfig(model=args.model, draft="none", offload="none", dtype=dtype), progress=lambda m: None)
        results[dtype] = {size: pass_seconds(pipeline.engine.target, size, args.repeats) for size in sizes}
        del pipeline
    print("| tree size | " + " | ".join(f"{d} (s)" for d in results) + " | " + " | ".join(f"{d} / its 1-token pass" for d in results) + " |")
    print("|---:|" + "---:|" * (2 * len(results)))
    for size in sizes:
        cells = [f"{results[d][size]:.3f}" for d in results] + [f"{results[d][size] / results[d][sizes[0]]:.2f}" for d in results]
        print(f"| {size} | " + " | ".join(cells) + " |")
    print(json.dumps({"threads": torch.get_num_threads(), "seconds": results}))


if __name__ == "__main__":
    main()
