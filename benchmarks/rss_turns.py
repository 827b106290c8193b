"""RSS after each of N chat turns on the demo pair (a short probe of the soak's slow RSS growth).

    .venv/bin/python benchmarks/rss_turns.py --turns 30
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=8 .venv/bin/python benchmarks/rss_turns.py --turns 30

Resets the conversation every 4th turn, as a user starting over would; prints the oneDNN
primitive-cache capacity it ran under (unset = oneDNN's default of 1024 kernels, each shape of
a matrix product one entry), the RSS after turn 5 and after the last turn, and every turn's RSS.
"""

from __future__ import annotations

import argparse
import os

import psutil

from specchat import ChatSession, RunConfig, load
from specchat.bench.sweep import load_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=30)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    pipeline = load(RunConfig(model="demo", max_new_tokens=args.max_new_tokens), lambda message: None)
    session = ChatSession(pipeline, pipeline.config.generation())
    prompts, process, rss_mb = load_prompts(None, 80), psutil.Process(), []
    for index in range(args.turns):
        for _ in session.reply(prompts[index % len(prompts)]):
            pass
        if index % 4 == 3:
            session.command("/reset")
        rss_mb.append(round(process.memory_info().rss / 2**20))
    after_warmup = rss_mb[min(4, len(rss_mb) - 1)]
    print(f"ONEDNN_PRIMITIVE_CACHE_CAPACITY={os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY', 'unset')}: "
          f"RSS {after_warmup} MB after turn 5, {rss_mb[-1]} MB after turn {len(rss_mb)} "
          f"(+{rss_mb[-1] - after_warmup} MB); per turn: {rss_mb}")


if __name__ == "__main__":
    main()
