"""--budget auto against the best fixed budget, in simulated sessions (no model; seconds to run).

Each session is 20 prompts of 64 tokens.  A prompt sets how far the target follows the draft:
each pass draws an acceptable length L (geometric; its mean changes from prompt to prompt) and
takes min(L, depth(K)) + 1 tokens, depth(K) the depth of a K-node tree along the target's path.
Two drafts: "chain", a draft made from the target (its tree is nearly one chain: depth 0.75 K,
at most 32; one draft step per level), and "bushy", a sibling (depth ~1.3 log2 K).  Two targets:
"streamed" (its pass costs the same until compute catches up with the stream) and "resident"
(the pass grows with K).  The tuner is fed what the engine feeds it: tokens, seconds, whether
the path ran out of tree, and the tokens each smaller budget's tree would have given.

    .venv/bin/python benchmarks/tuner_sim.py [--sessions 16]

prints, per case, the mean and the worst over sessions of auto's tokens/s over the best fixed
budget's in the same session (the same prompts and draws).
"""

from __future__ import annotations

import argparse
import math
import random

from specchat.engine.autobudget.costmodel import Calibration, CostModelTuner

SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TARGETS = {
    "streamed": {1: 1.55, 16: 1.6, 32: 1.65, 64: 2.0, 128: 2.8, 256: 4.2, 512: 7.0, 1024: 12.0},
    "resident": {k: 0.3 + 0.02 * k for k in SIZES},
}
DRAFTS = {  # name -> (depth(K), drafting seconds(K, levels drafted), prompts' mean acceptable lengths, prior beta)
    "chain": (lambda k: min(32, max(1, round(0.75 * k))), lambda k, levels: 0.09 * levels + 0.006 * k, (6, 10, 14, 20, 30), 2.0),
    "bushy": (lambda k: int(1.3 * math.log2(1 + k)) + 1, lambda k, levels: 0.1 + 0.004 * k, (0.8, 1.5, 2.3), 0.6),
}


def session(draft: str, target: str, seed: int, fixed: int | None = None, prompts: int = 20, tokens: int = 64) -> float:
    """Tokens/s of one simulated session, with --budget auto or a fixed budget."""
    depth, drafting, means, beta = DRAFTS[draft]
    target_s = TARGETS[target]
    calibration = Calibration(target_s, {"specexec": {k: 1.5 * drafting(k, depth(k)) + 0.006 * k for k in SIZES}})
    tuner = CostModelTuner(calibration, "specexec", 32, prior_beta=beta)
    rng = random.Random(seed)
    made = seconds = 0.0
    for _ in range(prompts):
        mean, got = rng.choice(means), 0
        while got < tokens:
            k = fixed or tuner.current
            length = int(rng.expovariate(1 / mean))
            taken = min(length, depth(k)) + 1
            draft_s, pass_s = drafting(k, min(depth(k), length + 3)), calibration.target(k)
            within = {b: min(length, depth(b)) + 1 for b in tuner.candidates_below(k)}
            tuner.observe(k, taken, draft_s, pass_s, length >= depth(k), within)
            got += taken
            made, seconds = made + taken, seconds + draft_s + pass_s
    return made / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=16)
    args = parser.parse_args()
    print(f"{'draft':6} {'target':9} {'auto / best fixed: mean':>24} {'worst':>6}  best fixed budgets")
    for draft in DRAFTS:
        for target in TARGETS:
            ratios, bests = [], []
            for seed in range(args.sessions):
                fixed = {k: session(draft, target, seed, k) for k in (2, 4, 8, 16, 32, 64, 128)}
                best = max(fixed, key=fixed.get)
                ratios.append(session(draft, target, seed) / fixed[best])
                bests.append(best)
            print(f"{draft:6} {target:9} {sum(ratios) / len(ratios):24.3f} {min(ratios):6.3f}  {sorted(set(bests))}")


if __name__ == "__main__":
    main()
