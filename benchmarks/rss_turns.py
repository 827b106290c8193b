"""RSS, speed and live objects after each of N chat turns on the demo pair (a short probe of the
soak's slow RSS growth).

    .venv/bin/python benchmarks/rss_turns.py --turns 30
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=8 .venv/bin/python benchmarks/rss_turns.py --turns 30
    MALLOC_ARENA_MAX=2 .venv/bin/python benchmarks/rss_turns.py --turns 30
    .venv/bin/python benchmarks/rss_turns.py --turns 30 --trim      # malloc_trim after every turn
    .venv/bin/python benchmarks/rss_turns.py --turns 48 --cycle 8   # one 8-turn conversation, six times

Resets the conversation every 4th turn, as a user starting over would (with ``--cycle C``:
plays the first C prompts as one conversation, resets, and plays them again).  Prints the environment
it ran under (oneDNN's primitive-cache capacity, each shape of a matrix product one entry:
specchat sets 64 unless exported, oneDNN's own default is 1024; glibc's arena cap), the RSS after turn 5 and after the last turn,
the median tokens/s over turns 5 on, and per turn: RSS MB, tokens/s, live Python objects,
live torch tensors (after a gc) and the KV caches' buffers, so a growth can be told apart from
held objects.
"""

from __future__ import annotations

import argparse
import ctypes
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
    parser.add_argument("--cycle", type=int, default=None, help="replay the first CYCLE prompts as one conversation, reset, and again (a leak grows every cycle; a high-water mark only in the first)")
    parser.add_argument("--trim", action="store_true", help="hand the C heap's free pages back after every turn (malloc_trim)")
    args = parser.parse_args()
    pipeline = load(RunConfig(model="demo", max_new_tokens=args.max_new_tokens), lambda message: None)
    session = ChatSession(pipeline, pipeline.config.generation())
    prompts, process, rows = load_prompts(None, 80), psutil.Process(), []
    for index in range(args.turns):
        started = time.perf_counter()
        period = args.cycle or len(prompts)
        done = [e for e in session.reply(prompts[index % period]) if isinstance(e, DoneEvent)][-1]
        speed = done.stats.new_tokens / (time.perf_counter() - started)
        if index % (args.cycle or 4) == (args.cycle or 4) - 1:
            session.command("/reset")
        gc.collect()
        if args.trim:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        caches = [c for c in (pipeline.engine.target_cache, pipeline.engine.draft_cache) if c is not None]
        rows.append((round(process.memory_info().rss / 2**20), round(speed, 2), len(gc.get_objects()), live_tensors(),
                     round(sum(c.nbytes() for c in caches) / 2**20, 1)))
    warm = min(4, len(rows) - 1)
    environment = " ".join(f"{name}={os.environ.get(name, 'unset')}" for name in ENVIRONMENT)
    print(f"{environment}{' trim' if args.trim else ''}: RSS {rows[warm][0]} MB after turn 5, {rows[-1][0]} MB after turn {len(rows)} "
          f"(+{rows[-1][0] - rows[warm][0]} MB); median {statistics.median(r[1] for r in rows[warm:]):.2f} tok/s; "
          f"objects {rows[warm][2]} -> {rows[-1][2]}, tensors {rows[warm][3]} -> {rows[-1][3]}")
    if args.cycle:
        print("  RSS MB after each cycle:", [row[0] for row in rows[args.cycle - 1 :: args.cycle]])
    print("  per turn (RSS MB, tok/s, objects, tensors, KV cache MB):", rows)


if __name__ == "__main__":
    main()
