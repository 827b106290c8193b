"""RSS, speed and live objects after each of N chat turns on the demo pair (a short probe of the
soak's slow RSS growth).

    .venv/bin/python benchmarks/rss_turns.py --turns 30
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=8 .venv/bin/python benchmarks/rss_turns.py --turns 30
    MALLOC_ARENA_MAX=2 .venv/bin/python benchmarks/rss_turns.py --turns 30

Resets the conversation every 4th turn, as a user starting over would.  Prints the environment
it ran under (oneDNN's primitive-cache capacity: unset = its default of 1024 kernels, each shape
of a matrix product one entry; glibc's arena cap), the RSS after turn 5 and after the last turn,
the median tokens/s over turns 5 on, and per turn: RSS MB, tokens/s, live Python objects,
live torch tensors (after a gc) and the KV caches' buffers, so a growth can be told apart from
held objects.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import psutil
import torch

from specchat import ChatSession, DoneEvent, RunConfig, load
from specchat.bench.sweep import load_prompts

ENVIRONMENT = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_")


def live_tensors() -> int:
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=30)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    pipeline = load(RunConfig(model="demo", max_new_tokens=args.max_new_tokens), lambda message: None)
    session = ChatSession(pipeline, pipeline.config.generation())
    prompts, process, rows = load_prompts(None, 80), psutil.Process(), []
    for index in range(args.turns):
        started = time.perf_counter()
        done = [e for e in session.reply(prompts[index % len(prompts)]) if isinstance(e, DoneEvent)][-1]
        speed = done.stats.new_tokens / (time.perf_counter() - started)
        if index % 4 == 3:
            session.command("/reset")
        gc.collect()
        caches = [c for c in (pipeline.engine.target_cache, pipeline.engine.draft_cache) if c is not None]
        rows.append((round(process.memory_info().rss / 2**20), round(speed, 2), len(gc.get_objects()), live_tensors(),
                     round(sum(c.nbytes() for c in caches) / 2**20, 1)))
    warm = min(4, len(rows) - 1)
    environment = " ".join(f"{name}={os.environ.get(name, 'unset')}" for name in ENVIRONMENT)
    print(f"{environment}: RSS {rows[warm][0]} MB after turn 5, {rows[-1][0]} MB after turn {len(rows)} "
          f"(+{rows[-1][0] - rows[warm][0]} MB); median {statistics.median(r[1] for r in rows[warm:]):.2f} tok/s; "
          f"objects {rows[warm][2]} -> {rows[-1][2]}, tensors {rows[warm][3]} -> {rows[-1][3]}")
    print("  per turn (RSS MB, tok/s, objects, tensors, KV cache MB):", rows)


if __name__ == "__main__":
    main()
