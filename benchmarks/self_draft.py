"""How well each draft agrees with the demo target, and what one draft step costs.

Agreement: the target's greedy continuation of each prompt (``--tokens`` new tokens), then one
teacher-forced forward of each draft over prompt + continuation; the share of continuation
positions where the target's token is among the draft's top 1/2/4.  Step cost: one draft
forward of ``width`` new nodes after a 200-token cached prefix (median of 5).

    .venv/bin/python benchmarks/self_draft.py --n 10 --tokens 48

Needs the demo pair materialised (`specchat setup demo`, or any `specchat run --model demo`).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from specchat.app.config import RunConfig
from specchat.app.loader import load_pipeline
from specchat.bench.sweep import load_prompts
from specchat.model.lm import causal_visibility
from specchat.model.loading import load_int8
from specchat.model.selfdraft import build_self_draft, self_draft_bytes
from specchat.sources.facts import read_facts
from specchat.sources.registry import load_registry
from specchat.sources.resolve import materialize, parse_model_spec


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def greedy_continuation(lm, ids: list[int], new: int) -> list[int]:
    cache = lm.new_cache()
    out = list(ids)
    logits = lm.forward(torch.tensor(out), torch.arange(len(out)), causal_visibility(0, len(out)), cache)
    for _ in range(new):
        out.append(int(logits[-1].argmax()))
        n = cache.length
        logits = lm.forward(torch.tensor(out[-1:]), torch.tensor([n]), causal_visibility(n, 1), cache)
    return out


def agreement(draft, sequence: list[int], start: int) -> list[int]:
    """Rank of the target's token in the draft's logits at each continuation position."""
    logits = draft.forward(torch.tensor(sequence), torch.arange(len(sequence)), causal_visibility(0, len(sequence)), draft.new_cache())
    ranks = []
    for position in range(start, len(sequence)):
        row = logits[position - 1]
        ranks.append(int((row > row[sequence[position]]).sum()))
    return ranks


def step_seconds(draft, prefix: list[int], width: int) -> float:
    cache = draft.new_cache()
    draft.forward(torch.tensor(prefix), torch.arange(len(prefix)), causal_visibility(0, len(prefix)), cache)
    times = []
    for _ in range(5):
        started = time.perf_counter()
        ids = torch.tensor(prefix[-1:] * width)
        positions = torch.full((width,), len(prefix))
        visible = torch.cat([torch.ones(width, cache.length, dtype=torch.bool), torch.eye(width, dtype=torch.bool)], 1)
        draft.forward(ids, positions, visible, cache)
        times.append(time.perf_counter() - started)
        cache.crop(len(prefix))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--kinds", default="sibling,int8,int4")
    args = parser.parse_args()
    pipeline = load_pipeline(RunConfig(model="demo", draft="none", offload="none", budget=16), calibrate=False)
    target = pipeline.engine.target
    facts = read_facts(pipeline.target.path)
    print(f"target: demo in {target.dtype}; peak RSS so far {peak_rss_bytes() / 1e9:.2f} GB", flush=True)
    drafts = {}
    for kind in args.kinds.split(","):
        started = time.perf_counter()
        if kind == "sibling":
            registry = load_registry()
            drafts[kind] = load_int8(materialize(parse_model_spec("demo-0.5b", registry), print)).lm
            size = "demo-0.5b int8"
        else:
            drafts[kind] = build_self_draft(target, facts, kind)
            size = f"{self_draft_bytes(facts, kind, target.dtype) / 1e9:.2f} GB"
        print(f"{kind}: built in {time.perf_counter() - started:.1f} s ({size}); peak RSS {peak_rss_bytes() / 1e9:.2f} GB", flush=True)
    ranks = {kind: [] for kind in drafts}
    prompts = load_prompts(None, args.n)
    for index, prompt in enumerate(prompts):
        ids = pipeline.encode_chat([{"role": "user", "content": prompt}])
        sequence = greedy_continuation(target, ids, args.tokens)
        for kind, draft in drafts.items():
            ranks[kind] += agreement(draft, sequence, len(ids))
        print(f"prompt {index + 1}/{len(prompts)} done", flush=True)
    prefix = pipeline.encode_chat([{"role": "user", "content": prompts[0]}])[:200]
    print("draft      top-1  top-2  top-4   step ms at width 1 / 8 / 32")
    for kind, draft in drafts.items():
        r = ranks[kind]
        shares = [sum(x < k for x in r) / len(r) for k in (1, 2, 4)]
        steps = [1e3 * step_seconds(draft, prefix, w) for w in (1, 8, 32)]
        print(f"{kind:9}  " + "  ".join(f"{s:.3f}" for s in shares) + "   " + " / ".join(f"{s:.0f}" for s in steps))
    steps = [1e3 * step_seconds(target, prefix, w) for w in (1, 8, 32)]
    print(f"{'target':9}  1.000  1.000  1.000   " + " / ".join(f"{s:.0f}" for s in steps))


if __name__ == "__main__":
    main()
