"""Time one streamed target pass against the tree size, next to the bytes it read from disk.

    .venv/bin/python benchmarks/ssd_pass_time.py --model demo --ram-budget 0 --sizes 1,16,64,256,1024 [--quant 4bit] [--dtype bfloat16]

The pass for 1 token should cost about (bytes read) / (disk bandwidth): the stream is the
floor, and the curve stays flat until compute catches up with the stream.  The floor is
measured right before each pass by reading the same layer files with the same reader and
nothing else running (the virtual disk here varies by 2x over minutes, so a bandwidth taken
once at the start would make the ratio meaningless); `specchat detect`'s figure on a fresh
256 MB file is printed for reference.
"""

from __future__ import annotations

import argparse
import json
import mmap
import time

import torch

from specchat.app.config import RunConfig, parse_size
from specchat.app.hardware import disk_bandwidth
from specchat.common.iostats import disk_read_bytes
from specchat.model.lm import causal_visibility
from specchat.common.paths import cache_dir
from specchat.app.loader import load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo")
    parser.add_argument("--ram-budget", default="0")
    parser.add_argument("--sizes", default="1,16,64,256,1024")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quant", default="16bit", choices=["16bit", "4bit"])
    parser.add_argument("--dtype", default="float32", help="compute dtype (--dtype of run); bfloat16 streams a bf16 store as read")
    args = parser.parse_args()
    budget = parse_size(args.ram_budget)
    config = RunConfig(model=args.model, draft="none", quant=args.quant, offload="ssd", ram_budget=max(budget, 1), dtype=args.dtype)
    pipeline = load_pipeline(config, progress=lambda m: print(m, flush=True))
    target = pipeline.engine.target
    bandwidth, direct = disk_bandwidth(cache_dir() / "stores")
    print(f"disk: {bandwidth / 1e9:.2f} GB/s ({'O_DIRECT' if direct else 'buffered'}); {pipeline.offload.reason}")
    source = target.layer_source
    scratch = mmap.mmap(-1, source.store.layer_bytes)

    def pure_read_s() -> float:
        start = time.perf_counter()
        for index in source.streamed:
            source.reader.read_into(index, scratch)
        return time.perf_counter() - start

    prefix = torch.randint(0, 1000, (64,))
    results = []
    for size in [int(s) for s in args.sizes.split(",")]:
        cache = target.new_cache()
        target.forward(prefix, torch.arange(64), causal_visibility(0, 64), cache, logit_rows=torch.tensor([63]))
        ids = torch.randint(0, 1000, (size,))
        times, reads, floors = [], [], []
        for _ in range(args.repeats):
            floors.append(pure_read_s())
            cache.crop(64)
            before, start = disk_read_bytes(), time.perf_counter()
            target.forward(ids, torch.arange(64, 64 + size), causal_visibility(64, size), cache)
            times.append(time.perf_counter() - start)
            reads.append(disk_read_bytes() - before)
        row = {"tree_size": size, "pass_s": min(times), "read_bytes": reads[-1], "stream_floor_s": min(floors)}
        results.append(row)
        print(
            f"tree {size:5d}: pass {row['pass_s']:6.2f} s, read {row['read_bytes'] / 1e9:5.2f} GB, "
            f"floor {row['stream_floor_s']:5.2f} s ({row['read_bytes'] / row['stream_floor_s'] / 1e9:.2f} GB/s), pass/floor {row['pass_s'] / row['stream_floor_s']:.2f}",
            flush=True,
        )
    print(json.dumps({"dtype": args.dtype, "quant": args.quant, "bandwidth_gbps": bandwidth / 1e9, "direct": direct, "rows": results}))


if __name__ == "__main__":
    main()
