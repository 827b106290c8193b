"""Time one streamed target pass against the tree size, next to the bytes it read from disk.

    .venv/bin/python benchmarks/ssd_pass_time.py --model demo --ram-budget 0 --sizes 1,16,64,256,1024

The pass for 1 token should cost about (bytes read) / (disk bandwidth): the stream is the
floor, and the curve stays flat until compute catches up with the stream.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from specchat.config import RunConfig, parse_size
from specchat.hardware import disk_bandwidth
from specchat.iostats import disk_read_bytes
from specchat.lm import causal_visibility
from specchat.paths import cache_dir
from specchat.pipeline import load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo")
    parser.add_argument("--ram-budget", default="0")
    parser.add_argument("--sizes", default="1,16,64,256,1024")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    budget = parse_size(args.ram_budget)
    config = RunConfig(model=args.model, draft="none", offload="ssd", ram_budget=max(budget, 1))
    pipeline = load_pipeline(config, progress=lambda m: print(m, flush=True))
    target = pipeline.engine.target
    bandwidth, direct = disk_bandwidth(cache_dir() / "stores")
    print(f"disk: {bandwidth / 1e9:.2f} GB/s ({'O_DIRECT' if direct else 'buffered'}); {pipeline.offload.reason}")
    prefix = torch.randint(0, 1000, (64,))
    results = []
    for size in [int(s) for s in args.sizes.split(",")]:
        cache = target.new_cache()
        target.forward(prefix, torch.arange(64), causal_visibility(0, 64), cache, logit_rows=torch.tensor([63]))
        ids = torch.randint(0, 1000, (size,))
        times, reads = [], []
        for _ in range(args.repeats):
            cache.crop(64)
            before, start = disk_read_bytes(), time.perf_counter()
            target.forward(ids, torch.arange(64, 64 + size), causal_visibility(64, size), cache)
            times.append(time.perf_counter() - start)
            reads.append(disk_read_bytes() - before)
        row = {"tree_size": size, "pass_s": min(times), "read_bytes": reads[-1], "stream_floor_s": reads[-1] / bandwidth}
        results.append(row)
        print(
            f"tree {size:5d}: pass {row['pass_s']:6.2f} s, read {row['read_bytes'] / 1e9:5.2f} GB, "
            f"floor {row['stream_floor_s']:5.2f} s, pass/floor {row['pass_s'] / row['stream_floor_s']:.2f}",
            flush=True,
        )
    print(json.dumps({"bandwidth_gbps": bandwidth / 1e9, "direct": direct, "rows": results}))


if __name__ == "__main__":
    main()
