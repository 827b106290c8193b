"""Greedy SpecExec == greedy autoregressive decoding on MT-Bench first turns (demo pair).

    .venv/bin/python benchmarks/greedy_check.py --n 20 --max-new-tokens 64 --budget 16 [--dtype bfloat16]

Float32 on a CPU is not bit-reproducible across different matrix shapes (a tree pass and a
one-token pass sum in different orders), so a near-tie between two tokens can flip; the goal
is at least 19 of 20 identical.  Where the two differ, the script prints the plain run's margin
between its top two logits at the first differing token, in the dtype computed: a flip at a
near-tie (a margin of a few rounding steps) is numerics, a flip at a clear margin would be a bug.
"""

from __future__ import annotations

import argparse
import json

import torch

from specchat.bench.sweep import load_prompts
from specchat.app.config import RunConfig
from specchat.engine.config import GenerationConfig
from specchat.model.lm import causal_visibility
from specchat.app.loader import load_pipeline


def top_two_margin(pipeline, ids: list[int]) -> float:
    """The target's top-1 minus top-2 logit after ``ids``, computed the plain way (one causal prefill)."""
    target = pipeline.engine.target
    cache = target.new_cache()
    logits = target.forward(torch.tensor(ids), torch.arange(len(ids)), causal_visibility(0, len(ids)), cache,
                            logit_rows=torch.tensor([len(ids) - 1]))[0]
    top = logits.topk(2).values
    return round(float(top[0] - top[1]), 4)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--budget", type=int, default=16)
    parser.add_argument("--method", default="specexec")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    pipeline = load_pipeline(RunConfig(model="demo", dtype=args.dtype), progress=lambda m: None)
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
        margin = None if first_diff is None else top_two_margin(pipeline, ids + list(outputs[0].token_ids[:first_diff]))
        print(json.dumps({"prompt": index, "identical": same, "first_difference": first_diff, "plain_margin": margin,
                          "tokens_per_pass": outputs[1].stats.tokens_per_pass}), flush=True)
    print(f"{identical} of {args.n} identical")


if __name__ == "__main__":
    main()
