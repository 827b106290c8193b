"""How many tokens per pass the draft's probabilities allow at all, greedy (issue 2's >= 10 goal).

    .venv/bin/python benchmarks/acceptance_limit.py --n 20 --max-new-tokens 64

For each MT-Bench first turn: the target's greedy continuation (plain decoding, the engine's AR
method), then one draft forward over prompt + continuation, which gives q_i, the draft's
probability of the target's token i after the target's own prefix, and its rank among the
draft's tokens.

Then passes are replayed along that continuation for idealised trees:
  chain        the draft's greedy chain, unlimited length: a pass accepts the run of
               positions where the target's token is the draft's top-1;
  q >= 1/k     a tree holding every path whose cumulative draft probability from the pass's
               root is >= 1/k: a pass accepts positions while the product of their q_i stays
               >= 1/k.  How many nodes such a tree has is not computed (it needs the draft's
               whole expansion); the rows show how deep into improbable paths a tree must
               reach for a given number of tokens per pass, to set beside what the real
               K-node trees accept (docs/benchmarks.md).
Each pass also yields the target's own next token (+1), as in the engine; depth is capped at 32.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from specchat.bench.sweep import load_prompts
from specchat.app.config import RunConfig
from specchat.engine.config import GenerationConfig
from specchat.engine.events import DoneEvent
from specchat.model.lm import causal_visibility
from specchat.app.loader import load_pipeline

MAX_DEPTH = 32


def replay(accepts_next, length: int) -> int:
    """Passes to produce ``length`` tokens, where ``accepts_next(start, depth)`` says whether a
    pass that began at ``start`` also accepts the token at ``start + depth``."""
    position = passes = 0
    while position < length:
        depth = 0
        while position + depth < length - 1 and depth < MAX_DEPTH and accepts_next(position, depth):
            depth += 1
        position += depth + 1  # the accepted run, plus the target's own token
        passes += 1
    return passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--taus", default="16,256,4096,65536,1048576,16777216", help="k values: paths down to 1/k")
    args = parser.parse_args()
    ks = [int(k) for k in args.taus.split(",")]
    config = RunConfig(model="demo-1.5b", draft="demo-0.5b", quant="16bit", offload="none", method="ar")
    pipeline = load_pipeline(config, progress=lambda message: None)
    from specchat.model.loading import load_int8  # the draft exactly as the engine uses it on a CPU (int8)
    from specchat.sources.resolve import materialize, parse_model_spec
    from specchat.sources.registry import load_registry

    draft = load_int8(materialize(parse_model_spec("demo-0.5b", load_registry()))).lm
    ranks_all: list[int] = []
    lengths: list[int] = []
    results = {"chain": []} | {f"1/{k}": [] for k in ks}
    for index, prompt in enumerate(load_prompts(None, args.n)):
        ids = pipeline.encode_chat([{"role": "user", "content": prompt}])
        pipeline.engine.reset()
        generation = GenerationConfig(method="ar", max_new_tokens=args.max_new_tokens)
        done = [e for e in pipeline.engine.generate(ids, generation) if isinstance(e, DoneEvent)][-1]
        path = list(done.token_ids)
        sequence = torch.tensor(ids + path)
        logits = draft.forward(sequence, torch.arange(len(sequence)), causal_visibility(0, len(sequence)), draft.new_cache())
        rows = logits[len(ids) - 1 : len(ids) - 1 + len(path)]  # (L, vocab): the draft's guess for each path token
        log_q = torch.log_softmax(rows.float(), dim=-1)
        targets = torch.tensor(path)
        chosen = log_q.gather(1, targets[:, None])[:, 0]  # (L,) log q_i
        ranks = (log_q > chosen[:, None]).sum(dim=1).tolist()  # (L,) 0 = the draft's top-1
        ranks_all += ranks
        lengths.append(len(path))
        prefix_log_q = torch.cat([torch.zeros(1), chosen.cumsum(0)]).tolist()
        results["chain"].append(replay(lambda start, depth: ranks[start + depth] == 0, len(path)))
        for k in ks:
            bound = -torch.log(torch.tensor(float(k))).item()
            results[f"1/{k}"].append(replay(
                lambda start, depth, bound=bound: prefix_log_q[start + depth + 1] - prefix_log_q[start] >= bound, len(path)
            ))
        print(json.dumps({"prompt": index, "tokens": len(path), "top1": sum(r == 0 for r in ranks) / len(ranks),
                          **{name: round(len(path) / values[-1], 2) for name, values in results.items()}}), flush=True)
    total = len(ranks_all)
    print(f"\n{args.n} prompts, {total} target tokens; draft rank of the target's greedy token: "
          + ", ".join(f"top-{k} {sum(r < k for r in ranks_all) / total:.1%}" for k in (1, 2, 4, 8, 16)))
    print("\n| idealised tree | tok/pass (all tokens / all passes) | per prompt: median | max |")
    print("|---|---:|---:|---:|")
    for name, passes in results.items():
        label = "greedy chain, any length" if name == "chain" else f"every path with cumulative q >= {name}"
        per_prompt = [n / p for n, p in zip(lengths, passes)]
        print(f"| {label} | {sum(lengths) / sum(passes):.2f} | {statistics.median(per_prompt):.2f} | {max(per_prompt):.2f} |")


if __name__ == "__main__":
    main()
