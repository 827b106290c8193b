"""Greedy SpecExec == greedy autoregressive decoding on MT-Bench first turns (demo pair).

    .venv/bin/python benchmarks/greedy_check.py --n 20 --max-new-tokens 64 --budget 16

Float32 on a CPU is not bit-reproducible across different matrix shapes (a tree pass and a
one-token pass sum in different orders), so a near-tie between two tokens can flip; the goal
is at least 19 of 20 identical.
"""

from __future__ import annotations

import argparse
import json

from specchat.bench import load_prompts
from specchat.config import RunConfig
from specchat.engine import GenerationConfig
from specchat.pipeline import load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--budget", type=int, default=16)
    parser.add_argument("--method", default="specexec")
    args = parser.parse_args()
    pipeline = load_pipeline(RunConfig(model="demo"), progress=lambda m: None)
    identical = 0
    for index, prompt in enumerate(load_prompts(None, args.n)):
        ids = pipeline.encode_chat([{"role": "user", "content": prompt}])
        outputs = []
        for method in ("ar", args.method):
            pipeline.engine.reset()
            config = GenerationConfig(method=method, budget=args.budget, max_new_tokens=args.max_new_tokens)
            outputs.append(list(pipeline.engine.generate(ids, config))[-1])
        same = outputs[0].token_ids == outputs[1].token_ids
        identical += same
        first_diff = next((i for i, (a, b) in enumerate(zip(outputs[0].token_ids, outputs[1].token_ids)) if a != b), None)
        print(json.dumps({"prompt": index, "identical": same, "first_difference": first_diff,
                          "tokens_per_pass": outputs[1].stats.tokens_per_pass}), flush=True)
    print(f"{identical} of {args.n} identical")


if __name__ == "__main__":
    main()
