"""The budget tuner climbs to big trees when passes cost the same for any size, stays small when they do not."""

import math

import pytest

from specchat.autobudget import BudgetTuner
from specchat.engine import Engine, GenerationConfig

from tiny import CharTokenizer, tiny_lm


def tokens_per_pass(k: int) -> float:
    return 1 + 1.5 * math.log2(k + 1)  # grows like log K, as the SpecExec paper measures


def simulate(seconds_per_pass, start: int, passes: int = 200) -> BudgetTuner:
    tuner = BudgetTuner(start)
    for _ in range(passes):
        k = tuner.current
        tuner.observe(k, round(tokens_per_pass(k)), seconds_per_pass(k))
    return tuner


def best_fixed(seconds_per_pass) -> int:
    ks = [2 ** i for i in range(1, 11)]
    return max(ks, key=lambda k: round(tokens_per_pass(k)) / seconds_per_pass(k))


@pytest.mark.parametrize(
    "name, cost",
    [
        ("streamed: flat until compute catches up at ~256", lambda k: 2.5 + max(0.0, (k - 256) * 0.01)),
        ("resident CPU: compute grows with K", lambda k: 0.4 + 0.08 * k),
        ("in between", lambda k: 1.0 + 0.02 * k),
    ],
)
def test_the_tuner_finds_the_best_fixed_budget(name, cost):
    for start in (2, 16, 512):
        tuner = simulate(cost, start)
        best = best_fixed(cost)
        ours = round(tokens_per_pass(tuner.current)) / cost(tuner.current)
        top = round(tokens_per_pass(best)) / cost(best)
        assert ours >= 0.9 * top, (name, start, tuner.current, best)


def test_explain_names_the_measurements():
    tuner = simulate(lambda k: 1.0 + 0.02 * k, 16)
    assert tuner.explain().startswith(f"K={tuner.current}, the fastest measured (K=")


def test_auto_budget_keeps_greedy_output_exact_and_records_what_it_used():
    target, draft = tiny_lm(0), tiny_lm(0)
    engine = Engine(target, draft, CharTokenizer(), [])
    events = list(engine.generate([1, 2, 3], GenerationConfig(budget=4, auto_budget=True, max_new_tokens=60)))
    reference = Engine(target, None, CharTokenizer(), [])
    plain = list(reference.generate([1, 2, 3], GenerationConfig(method="ar", max_new_tokens=60)))
    assert events[-1].token_ids == plain[-1].token_ids
    sizes = {e.tree_size for e in events[:-1]}
    assert len(sizes) > 1  # it tried more than one budget
    assert engine.tuners[("specexec", True)].current >= 2
