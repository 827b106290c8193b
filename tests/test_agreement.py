"""Greedy SpecExec trees scored by the measured agreement between draft and target."""

import math

import pytest
import torch

from specchat.engine.config import GenerationConfig
from specchat.engine.engine import Engine
from specchat.model.lm import LayeredLM
from specchat.engine.autobudget.costmodel import Calibration, CostModelTuner
from specchat.engine.autobudget.costs import PassCosts
from specchat.speculation.agreement import BINS, SELF_DRAFT_RATE, GreedyAgreement
from tiny import CharTokenizer, tiny_hf


def _log_probs(*rows):
    return torch.tensor(rows, dtype=torch.float64).log()


def test_an_unmeasured_draft_is_scored_by_its_own_probabilities():
    log_probs = _log_probs([0.45, 0.30, 0.05], [0.91, 0.05, 0.01])
    torch.testing.assert_close(GreedyAgreement().rescore(log_probs), log_probs)


def test_a_draft_the_target_always_follows_scores_its_favourite_near_one():
    agreement = GreedyAgreement()
    for _ in range(400):
        agreement.observe(0.45, True)
    scores = agreement.rescore(_log_probs([0.45, 0.30, 0.05])).exp()[0]
    assert scores[0] > 0.95  # the favourite is nearly certain now
    assert scores[1] / scores[2] == pytest.approx(0.30 / 0.05)  # the rest shared as the draft shares it
    assert float(scores.sum()) <= 1.0 + 1e-9


def test_an_overconfident_draft_is_scored_below_its_probability():
    agreement = GreedyAgreement()
    for hit in [True, False] * 200:  # taken half the time at q1 = 0.95
        agreement.observe(0.95, hit)
    assert float(agreement.rate(torch.tensor([0.95], dtype=torch.float64))) == pytest.approx(0.5, abs=0.02)
    # another bin keeps its prior
    assert float(agreement.rate(torch.tensor([0.25], dtype=torch.float64))) == pytest.approx(0.25)


@pytest.mark.parametrize("q1", [0.0, 1e-9, 0.5, 1.0 - 1e-15, 1.0])
def test_scores_stay_log_probabilities_at_the_edges(q1):
    agreement = GreedyAgreement()
    agreement.observe(min(q1, 0.999), True)
    rest = (1.0 - q1) / 2
    log_probs = torch.tensor([[math.log(q1) if q1 > 0 else -math.inf, math.log(rest) if rest > 0 else -math.inf, -math.inf]], dtype=torch.float64)
    scores = agreement.rescore(log_probs)
    assert not torch.isnan(scores).any() and bool((scores <= 0).all())
    assert BINS == 10


def test_learned_agreement_grows_deeper_trees_and_never_changes_the_output():
    target = LayeredLM(tiny_hf(0, dtype=torch.float32))
    draft = LayeredLM(tiny_hf(0, dtype=torch.float32))  # the target itself: every favourite is taken
    config = GenerationConfig(budget=16, max_new_tokens=40, adaptive=False)
    plain = list(Engine(target, None, CharTokenizer(), []).generate([1, 2, 3], GenerationConfig(method="ar", max_new_tokens=40)))[-1]
    per_pass = {}
    for learned in (False, True):
        engine = Engine(target, draft, CharTokenizer(), [], greedy_agreement=learned)
        done = list(engine.generate([1, 2, 3], config))[-1]
        assert done.token_ids == plain.token_ids
        per_pass[learned] = done.stats.tokens_per_pass
    assert per_pass[True] >= 2 * per_pass[False], per_pass


def test_sampling_trees_are_scored_by_the_draft_alone():
    target = LayeredLM(tiny_hf(0, dtype=torch.float32))
    engine = Engine(target, LayeredLM(tiny_hf(0, dtype=torch.float32)), CharTokenizer(), [])
    list(engine.generate([1, 2, 3], GenerationConfig(budget=8, max_new_tokens=12, temperature=0.8, seed=3)))
    assert torch.equal(engine.agreement.hits, GreedyAgreement().hits)  # nothing learned from sampled passes


def test_a_self_draft_prior_takes_favourites_at_its_rate_until_measured():
    middles = (torch.arange(BINS, dtype=torch.float64) + 0.5) / BINS
    prior = GreedyAgreement(prior_rate=SELF_DRAFT_RATE)
    torch.testing.assert_close(prior.rate(middles), torch.full((BINS,), SELF_DRAFT_RATE, dtype=torch.float64))
    for i in range(200):  # measured: the target takes half the favourites drafted at 0.55
        prior.observe(0.55, hit=i % 2 == 0)
    assert float(prior.rate(torch.tensor([0.55]))) == pytest.approx(0.5, abs=0.02)


class RecordingTuner(CostModelTuner):
    """A tuner held at one budget that records what every pass reported."""

    def __init__(self, budget: int) -> None:
        super().__init__(Calibration({1: 1.0, 16: 1.0}, {"specexec": {1: 0.1, 16: 0.4}}), "specexec", 32, initial=budget)
        self.budget, self.reports, self.withins = budget, [], []

    def observe(self, budget, tokens, draft_s, target_s, ran_out=False, within=None):
        self.reports.append((budget, tokens, ran_out))
        self.withins.append(within)
        self.current = self.budget


@pytest.mark.parametrize("draft_seed, ran_out", [(0, True), (7, False)], ids=["draft = target", "random draft"])
def test_each_pass_tells_the_tuner_whether_it_ran_out_of_tree(draft_seed, ran_out):
    """K=2, greedy: with the target as its own draft every pass takes a leaf (the favourite child, or
    the chain of two); a random draft's children are refused at the root, which has children.
    Each pass also says what budget 1 would have given: the best node alone, which the target takes
    when the draft is the target (2 tokens) and refuses when it is random (1)."""
    target = LayeredLM(tiny_hf(0, dtype=torch.float32))
    tuner = RecordingTuner(2)
    costs = PassCosts(Calibration({1: 1.0, 16: 1.0}, {"specexec": {1: 0.1, 16: 0.4}}))
    costs.tuners[("specexec", 0.0, 1.0)] = tuner
    engine = Engine(target, LayeredLM(tiny_hf(draft_seed, dtype=torch.float32)), CharTokenizer(), [], costs=costs)
    list(engine.generate([1, 2, 3], GenerationConfig(budget=None, max_new_tokens=24)))
    ends = [r[2] for r in tuner.reports]
    assert len(ends) >= 6 and all(budget == 2 for budget, _, _ in tuner.reports)
    assert all(set(within) == {1} and 1 <= within[1] <= tokens for within, (_, tokens, _) in zip(tuner.withins, tuner.reports))
    if ran_out:
        assert all(ends) and all(within[1] == 2 for within in tuner.withins)
    else:
        assert sum(ends) <= len(ends) // 4, tuner.reports
        assert sum(within[1] == 1 for within in tuner.withins) >= 3 * len(ends) // 4
