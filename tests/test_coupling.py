"""Sampling by shared noise (speculation/coupling.py): for a seed, sampled SpecExec gives plain
sampling's tokens whatever the draft, the budget or the lookahead; a draft equal to the target
accepts its whole path as greedily; and the noise is a function of (seed, index) alone.  That the
tokens follow the target's distribution: tests/test_sampling_distribution.py."""

import pytest
import torch

from specchat.engine.config import GenerationConfig
from specchat.engine.engine import Engine
from specchat.speculation.coupling import GumbelNoise
from specchat.speculation.lookahead import Lookahead
from specchat.speculation.speculator import SpecExec

from tiny import CharTokenizer, tiny_lm

PROMPTS = [[1], [3, 9, 27], [5, 4, 3, 2, 1, 6, 7, 8, 9, 10, 11]]


def sampled(engine: Engine, prompt, **config):
    settings = {"temperature": 0.8, "top_p": 0.9, "max_new_tokens": 30, **config}
    return list(engine.generate(prompt, GenerationConfig(**settings)))[-1]


def flat(seed: int):
    """A tiny model whose sampled tokens vary (its logits scaled down)."""
    model = tiny_lm(seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.3)
    return model


@pytest.mark.parametrize("draft_kind", ["same", "random"])
@pytest.mark.parametrize("budget", [1, 4, 16])
@pytest.mark.parametrize("lookahead", [False, True])
def test_sampled_specexec_gives_plain_samplings_tokens_for_a_seed(draft_kind, budget, lookahead):
    for seed in range(2):
        target = flat(seed)
        draft = target if draft_kind == "same" else flat(100 + seed)
        for prompt in PROMPTS:
            plain = sampled(Engine(target, None, CharTokenizer(), []), prompt, method="ar", seed=seed)
            engine = Engine(target, draft, CharTokenizer(), [], lookahead=Lookahead(patient=True) if lookahead else None)
            done = sampled(engine, prompt, budget=budget, draft_batch=4, seed=seed)
            assert done.token_ids == plain.token_ids, (seed, prompt)


def test_different_seeds_give_different_replies():
    target = flat(0)
    replies = {sampled(Engine(target, None, CharTokenizer(), []), [1, 2], method="ar", seed=s).token_ids for s in range(6)}
    assert len(replies) > 3


def test_a_draft_equal_to_the_target_accepts_its_whole_sampled_path():
    target = flat(0)
    engine = Engine(target, target, CharTokenizer(), [])
    done = sampled(engine, [1, 2, 3], budget=8, max_depth=8, draft_batch=1, adaptive=False, seed=3)
    assert done.stats.tokens_per_pass > 4  # uncoupled, a flat target's sampled tree accepts ~2 (below)


def test_coupling_deepens_what_a_sampled_pass_accepts():
    target, draft = flat(0), flat(0)
    per_pass = {}
    for coupled in (False, True):
        engine = Engine(target, draft, CharTokenizer(), [], speculators={"specexec": SpecExec(coupled=coupled)})
        done = sampled(engine, [1, 2, 3], budget=8, max_depth=8, draft_batch=1, adaptive=False, seed=3, max_new_tokens=60)
        per_pass[coupled] = done.stats.tokens_per_pass
    assert per_pass[True] > 1.5 * per_pass[False], per_pass


def test_the_noise_is_a_function_of_seed_and_index_alone():
    a, b = GumbelNoise(5, 100), GumbelNoise(5, 100)
    first = a.at(7).clone()
    for index in range(400):  # past the cache's size: evicted vectors come back the same
        a.at(index)
    assert torch.equal(a.at(7), first) and torch.equal(b.at(7), first)
    assert not torch.equal(a.at(8), first) and not torch.equal(GumbelNoise(6, 100).at(7), first)
    wide = a.rows([7], 120)
    assert torch.equal(wide[0, :100], first) and bool((wide[0, 100:] == -torch.inf).all())


def test_the_target_choice_is_a_gumbel_max_sample():
    """argmax log p + g over many indices draws each token at its probability."""
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    noise = GumbelNoise(11, 4)
    counts = torch.bincount(torch.tensor([noise.choose(probs, i) for i in range(6000)]), minlength=4).double()
    assert counts[3] == 0
    assert torch.allclose(counts[:3] / 6000, probs[:3], atol=0.025)
