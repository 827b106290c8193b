"""SpecExec with a fixed draft-step width vs. ``--draft-batch auto``, interleaved prompt by prompt.

Loads the pair once (as ``specchat run`` would, from the config plus the flags below), takes the
saved calibration for those settings (``specchat setup`` / ``bench --calibrate`` wrote it), and
for each MT-Bench first turn runs every (budget, width) combination back to back, so the ratio
holds on a noisy machine.  Prints one row per configuration: tokens per pass, draft steps per
pass, draft and target seconds per pass, tokens/s, and auto's tokens/s over the fixed width's.

  .venv/bin/python benchmarks/draft_width.py --offload none --n 4 --budgets 16,64
"""

from __future__ import annotations

import argparse
import statistics

from specchat.bench.sweep import load_prompts
from specchat.app.config import RunConfig
from specchat.engine.config import GenerationConfig
from specchat.engine.events import DoneEvent, TextEvent
from specchat.app.calibration import calibration_file, calibration_key
from specchat.app.loader import load_pipeline
from specchat.engine.autobudget.costmodel import load_calibration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--offload", default="none")
    parser.add_argument("--ram-budget", type=int, default=None, help="bytes")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--budgets", default="16,64")
    parser.add_argument("--fixed", type=int, default=8, help="the fixed width to compare with")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    settings = RunConfig(model="demo", draft="demo-0.5b", offload=args.offload, ram_budget=args.ram_budget, budget=64,
                         draft_batch=args.fixed)
    pipeline = load_pipeline(settings, lambda line: print(line, flush=True))
    key = calibration_key(pipeline, settings)
    calibration = load_calibration(calibration_file(), key)
    if calibration is None:
        raise SystemExit(f"no saved calibration for {key!r}: run `specchat bench --calibrate` with these settings first")
    pipeline.engine.costs.use(calibration)
    print(f"calibrated draft step seconds by width: {calibration.draft_step_s}", flush=True)
    prompts = load_prompts(None, args.n)
    rows: dict[tuple[int, str], list] = {}
    for index, prompt in enumerate(prompts):
        ids = pipeline.encode_chat([{"role": "user", "content": prompt}])
        for budget in [int(b) for b in args.budgets.split(",")]:
            for width in (str(args.fixed), "auto"):
                pipeline.engine.reset()
                config = GenerationConfig(budget=budget, draft_batch=None if width == "auto" else args.fixed,
                                          max_new_tokens=args.max_new_tokens, seed=index)
                forwards, done = [], None
                for event in pipeline.engine.generate(ids, config):
                    if isinstance(event, TextEvent):
                        forwards.append(pipeline.engine.last_draft_forwards)  # the pass that made it
                    elif isinstance(event, DoneEvent):
                        done = event
                steps = statistics.mean(forwards) if forwards else 0.0
                rows.setdefault((budget, width), []).append((done.stats, steps))
                print(f"prompt {index + 1} K={budget} width={width}: {done.stats.tokens_per_pass:.2f} tok/pass, "
                      f"{steps:.1f} draft steps/pass, {done.stats.tokens_per_s:.2f} tok/s", flush=True)
    print("\n| budget | width | tok/pass | draft steps/pass | draft s/pass | target s/pass | tok/s | auto / fixed |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for (budget, width), runs in sorted(rows.items()):
        passes = sum(s.target_passes for s, _ in runs)
        tokens = sum(s.new_tokens for s, _ in runs)
        seconds = sum(s.wall_s - s.prefill_s for s, _ in runs)
        fixed = rows[(budget, str(args.fixed))]
        fixed_rate = sum(s.new_tokens for s, _ in fixed) / sum(s.wall_s - s.prefill_s for s, _ in fixed)
        rate = tokens / seconds
        print(f"| {budget} | {width} | {tokens / passes:.2f} | {statistics.mean(st for _, st in runs):.1f} | "
              f"{sum(s.draft_s for s, _ in runs) / passes:.2f} | {sum(s.target_s for s, _ in runs) / passes:.2f} | "
              f"{rate:.2f} | {rate / fixed_rate:.2f} |")


if __name__ == "__main__":
    main()
