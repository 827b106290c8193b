"""Where greedy SpecExec's accepted path ends: at a leaf of the tree (the tree ran out: it was too
shallow) or at a miss (the target chose a token the tree did not hold below a node it had grown).

    .venv/bin/python benchmarks/tree_ends.py --n 3 --draft self:int4 --budgets 32,256,auto

One loaded pipeline (the issue-6 scenario by default: the demo target streamed from SSD with
``--ram-budget 770MB``); for each budget and prompt, one greedy reply whose every pass is
recorded by a speculator that walks as SpecExec does and keeps, per pass: the tree's size, its
depth, the accepted length, and whether the last accepted node had children.  Prints one table
per budget; with ``--log``, one JSON line per pass.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from specchat import RunConfig
from specchat.app.config import parse_size
from specchat.app.generate import stream_generate
from specchat.app.loader import load_pipeline
from specchat.bench.sweep import load_prompts
from specchat.engine.config import GenerationConfig
from specchat.engine.events import DoneEvent
from specchat.speculation.speculator import SpecExec


@dataclass(frozen=True)
class RecordingSpecExec(SpecExec):
    """SpecExec whose walk also notes where the accepted path ended (the walk itself unchanged)."""

    passes: list = field(default_factory=list)

    def walk(self, tree, logits, sampling, generator):
        accepted, drawn = super().walk(tree, logits, sampling, generator)
        children = tree.children()
        last = accepted[-1] if accepted else 0
        self.passes.append({
            "tree": tree.size - 1,
            "depth": int(tree.depths.max()),
            "accepted": len(accepted),
            "end": "miss" if children[last] else "leaf",
            "chain": _favourite_chain(tree, children),
        })
        return accepted, drawn


def _favourite_chain(tree, children) -> int:
    """How deep the path of first-drawn children goes (the draft's favourite at each node)."""
    node, depth = 0, 0
    while children[node]:
        node, depth = children[node][0], depth + 1
    return depth


def summary(passes: list[dict]) -> str:
    n = len(passes)
    leaf = [p for p in passes if p["end"] == "leaf"]
    mean = lambda key, rows: sum(r[key] for r in rows) / max(len(rows), 1)
    return (f"passes {n:3d}  tok/pass {mean('accepted', passes) + 1:5.2f}  tree {mean('tree', passes):6.1f}  "
            f"depth {mean('depth', passes):5.2f}  favourite chain {mean('chain', passes):5.2f}  "
            f"ended at a leaf {len(leaf)}/{n} ({len(leaf) / max(n, 1):.0%})  "
            f"accepted when at a leaf {mean('accepted', leaf):5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--draft", default="self:int4")
    parser.add_argument("--offload", default="ssd")
    parser.add_argument("--ram-budget", default="770MB")
    parser.add_argument("--budgets", default="32,256,auto")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--log", type=Path)
    args = parser.parse_args()
    budgets = [None if b == "auto" else int(b) for b in args.budgets.split(",")]
    config = RunConfig(model="demo", draft=args.draft, offload=args.offload, budget=None if None in budgets else budgets[0],
                       ram_budget=parse_size(args.ram_budget) if args.ram_budget else None)
    pipeline = load_pipeline(config, print)
    recorder = RecordingSpecExec()
    pipeline.engine.speculators = {"specexec": recorder}
    prompts = load_prompts(None, args.n)
    for budget in budgets:
        recorder.passes.clear()
        rows = []
        for number, prompt in enumerate(prompts):
            start = len(recorder.passes)
            generation = GenerationConfig(budget=budget, draft_batch=None, max_new_tokens=args.max_new_tokens)
            done = [e for e in stream_generate(pipeline, prompt, generation) if isinstance(e, DoneEvent)][-1]
            for row in recorder.passes[start:]:
                rows.append({"budget": budget or "auto", "prompt": number, **row})
            print(f"budget {budget or 'auto'} prompt {number + 1}/{len(prompts)}: {done.stats.tokens_per_pass:.2f} tok/pass, "
                  f"{done.stats.tokens_per_s:.2f} tok/s", flush=True)
        print(f"budget {budget or 'auto':>4}: {summary(recorder.passes)}", flush=True)
        if args.log:
            with args.log.open("a", encoding="utf-8") as log:
                for row in rows:
                    log.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
