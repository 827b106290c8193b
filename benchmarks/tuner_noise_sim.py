"""`--budget auto`'s tuner in a noisy simulation of the case its session-25 change targets: the
calibration says a big tree's drafting costs far more than the adaptive stop's trees cost at run
time.  Tokens per pass are exponential around a log curve of the budget, draft and target seconds
vary +-30% / +-10%; prints the tuner's mean tokens/s over seeds against the best fixed budget.

    .venv/bin/python benchmarks/tuner_noise_sim.py                 # the tuner in this checkout
    .venv/bin/python benchmarks/tuner_noise_sim.py --rev cdd50cf   # the tuner at a git revision
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from specchat.engine.autobudget.measure import TREE_SIZES


def target_s(k: int) -> float:
    return 1.2 + max(0, k - 256) * 0.004  # a streamed pass: flat until compute catches up


def calibrated_draft_s(k: int) -> float:
    return 0.12 + 0.03 * k  # a full k-node growth, as the calibration measures it


def draft_s(k: int) -> float:
    return 0.6 + 0.15 * math.log2(1 + k)  # what the adaptive stop's growths cost


def tokens(k: int) -> float:
    return min(1 + 1.2 * math.log2(1 + k), 9.0)


def cost_model(rev: str | None):
    """specchat.engine.autobudget.costmodel, from this checkout or from git revision ``rev``."""
    if rev is None:
        from specchat.engine.autobudget import costmodel
        return costmodel
    text = subprocess.run(["git", "show", f"{rev}:specchat/engine/autobudget/costmodel.py"],
                          check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "costmodel_at_rev.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("costmodel_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def simulate(cm, seed: int, passes: int) -> float:
    rng = random.Random(seed)
    calibration = cm.Calibration({k: target_s(k) for k in TREE_SIZES},
                                 {"specexec": {k: calibrated_draft_s(k) for k in TREE_SIZES}})
    tuner = cm.CostModelTuner(calibration, "specexec", 32, prior_beta=2.0)
    total_tokens = total_s = 0.0
    for _ in range(passes):
        k = tuner.current
        n = max(1, round(rng.expovariate(1 / tokens(k))))
        d, t = draft_s(k) * rng.uniform(0.7, 1.3), target_s(k) * rng.uniform(0.9, 1.1)
        total_tokens, total_s = total_tokens + n, total_s + d + t
        tuner.observe(k, n, d, t)
    return total_tokens / total_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", help="a git revision whose tuner to simulate (default: this checkout's)")
    parser.add_argument("--seeds", type=int, default=60)
    parser.add_argument("--passes", type=int, default=200)
    args = parser.parse_args()
    cm = cost_model(args.rev)
    best = max(cm.CANDIDATES, key=lambda k: tokens(k) / (draft_s(k) + target_s(k)))
    rates = [simulate(cm, seed, args.passes) for seed in range(args.seeds)]
    print(f"tuner ({args.rev or 'this checkout'}): mean {statistics.mean(rates):.2f} tok/s, "
          f"min {min(rates):.2f} over {args.seeds} seeds x {args.passes} passes; "
          f"best fixed budget {best}: {tokens(best) / (draft_s(best) + target_s(best)):.2f} tok/s")


if __name__ == "__main__":
    main()
