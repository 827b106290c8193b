"""Measuring the cost model: target pass time vs. tree size, draft growth time vs. budget and step time vs. width.

Runs on fresh caches over a fixed synthetic prefix, so it never disturbs a
conversation.  Each figure is the fastest of ``repeats`` runs after one warm-up
pass (the first pass over a store also verifies its checksums).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from specchat.engine.autobudget.costmodel import Calibration
from specchat.speculation.growth import GrowthParams
from specchat.speculation.speculator import SPECULATORS, speculator_for
from specchat.model.lm import LanguageModel, causal_visibility
from specchat.speculation.sampling import SamplingParams

TREE_SIZES = (1, 16, 64, 256)
DRAFT_WIDTHS = (1, 8, 32)
PREFIX = 32


def _prefix_ids(model: LanguageModel) -> list[int]:
    return [(101 + 7 * i) % model.vocab_size for i in range(PREFIX)]


def _fastest(run: Callable[[], None], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def time_forwards(model: LanguageModel, sizes: tuple[int, ...], repeats: int) -> dict[int, float]:
    """Seconds of one forward over ``size`` new tokens after a cached prefix, per size."""
    ids = _prefix_ids(model)
    cache = model.new_cache()
    model.forward(torch.tensor(ids), torch.arange(PREFIX), causal_visibility(0, PREFIX), cache, logit_rows=torch.tensor([PREFIX - 1]))
    times = {}
    for size in (sizes[0], *sizes):  # the first size twice: a warm-up
        new = torch.tensor([(ids[-1] + 3 * j) % model.vocab_size for j in range(size)])

        def one_pass() -> None:
            cache.crop(PREFIX)
            model.forward(new, torch.arange(PREFIX, PREFIX + size), causal_visibility(PREFIX, size), cache)

        times[size] = _fastest(one_pass, repeats)
    return times


def time_growth(draft: LanguageModel, method: str, budgets: tuple[int, ...], max_depth: int, batch: int, repeats: int) -> dict[int, float]:
    """Seconds to grow a (non-adaptive) tree of each budget with ``method``'s growth."""
    committed = _prefix_ids(draft)
    cache = draft.new_cache()
    draft.forward(
        torch.tensor(committed[:-1]), torch.arange(PREFIX - 1), causal_visibility(0, PREFIX - 1), cache,
        logit_rows=torch.tensor([PREFIX - 2]),
    )
    speculator = speculator_for(method)
    greedy = SamplingParams(0.0, 1.0)
    generator = torch.Generator().manual_seed(0)
    times = {}
    for budget in budgets:
        growth = GrowthParams(budget, max_depth, batch)

        def grow() -> None:
            cache.crop(PREFIX - 1)
            speculator.grow(draft, cache, committed, growth, greedy, generator)

        times[budget] = _fastest(grow, repeats)
    cache.crop(PREFIX - 1)
    return times


def measure_calibration(
    target: LanguageModel,
    draft: LanguageModel | None,
    max_depth: int = 32,
    batch: int = 8,
    sizes: tuple[int, ...] = TREE_SIZES,
    repeats: int = 1,
    progress: Callable[[str], None] = lambda _: None,
) -> Calibration:
    progress(f"calibrating: target pass at tree sizes {', '.join(map(str, sizes))}")
    target_s = time_forwards(target, sizes, repeats)
    draft_s, step_s = {}, {}
    if draft is not None:
        progress("calibrating: draft steps and tree growth")
        step_s = time_forwards(draft, DRAFT_WIDTHS, max(repeats, 2))
        for method in SPECULATORS:
            draft_s[method] = time_growth(draft, method, sizes, max_depth, batch, repeats)
    return Calibration({k: target_s[k] for k in sizes}, draft_s, step_s)
