"""Would a low-bit copy of the LM head pay for the self draft?  The self:int4 draft with the
target's own head against the same draft with an int8 (per row) or int4 (per group of 32) copy
of it, or the shortlist head (an int4 copy ranks, the target's rows score each row's best 64;
specchat.model.drafthead): agreement with the target's greedy continuations (share of positions whose
target token is in the draft's top 1/2/4) and one draft step's time at widths 1/8/32 after a
200-token prefix (benchmarks/self_draft.py's measures).

    .venv/bin/python benchmarks/draft_head.py --n 5
"""

from __future__ import annotations

import argparse
import copy

from self_draft import agreement, greedy_continuation, step_seconds

from specchat.app.config import RunConfig
from specchat.app.loader import load_pipeline
from specchat.bench.sweep import load_prompts
from specchat.common.paths import cache_dir
from specchat.model.drafthead import Shortlist
from specchat.model.selfdraft import build_self_draft, self_draft_dir
from specchat.sources.facts import read_facts
from specchat.weights.lowbit import Int4Linear, Int8Linear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()
    pipeline = load_pipeline(RunConfig(model="demo", draft="none", offload="none", budget=16), calibrate=False)
    target = pipeline.engine.target
    facts = read_facts(pipeline.target.path)
    base = build_self_draft(target, facts, "int4", cache_dir=self_draft_dir(cache_dir() / "stores", facts, "int4"))
    base.lm_head = target.lm_head  # whatever draft_head chose for this machine
    drafts = {f"int4, {target.dtype} head": base}
    heads = {
        "int8": lambda: Int8Linear.quantize(target.lm_head), "int4": lambda: Int4Linear.quantize(target.lm_head),
        "shortlist": lambda: Shortlist(target.lm_head, Int4Linear.quantize(target.lm_head, fit=False)),
    }
    for name, make in heads.items():
        drafts[f"int4, {name} head"] = other = copy.copy(base)
        other.lm_head = make().eval()
    ranks = {name: [] for name in drafts}
    prompts = load_prompts(None, args.n)
    for prompt in prompts:
        ids = pipeline.encode_chat([{"role": "user", "content": prompt}])
        sequence = greedy_continuation(target, ids, args.tokens)
        for name, draft in drafts.items():
            ranks[name] += agreement(draft, sequence, len(ids))
    prefix = pipeline.encode_chat([{"role": "user", "content": prompts[0]}])[:200]
    print(f"{len(next(iter(ranks.values())))} positions")
    print("draft                       top-1  top-2  top-4   step ms at width 1 / 8 / 32")
    for name, draft in drafts.items():
        shares = [sum(r < k for r in ranks[name]) / len(ranks[name]) for k in (1, 2, 4)]
        steps = [1e3 * step_seconds(draft, prefix, width) for width in (1, 8, 32)]
        print(f"{name:26}  " + "  ".join(f"{s:.3f}" for s in shares) + "   " + " / ".join(f"{s:.0f}" for s in steps))


if __name__ == "__main__":
    main()
