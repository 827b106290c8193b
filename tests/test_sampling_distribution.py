"""Sampled speculative decoding must follow the target's own distribution.

For each method we draw the first two generated tokens 20,000 times and compare
their joint histogram with the target's exact p(x1) * p(x2 | x1) by a
chi-square test.  The draft is an unrelated random model, so rejections,
residual draws and deeper acceptances all happen; or the target's own layers in int4,
attending to the target's cache, so that nearly everything is accepted; and trees the lookahead
began while the target verified the one before (the first three tokens).
"""

import pytest
import torch
from scipy.stats import chisquare

from specchat.engine.config import GenerationConfig
from specchat.engine.engine import Engine
from specchat.model.lm import causal_visibility
from specchat.speculation.sampling import SamplingParams, probabilities
from specchat.speculation.speculator import SPECULATORS, SpecExec

from tiny import CharTokenizer, tiny_hf, tiny_lm

DRAWS = 20_000
PROMPT = [3, 1, 4]
VOCAB = 12


def next_probs(target, tokens: list[int], sampling: SamplingParams) -> torch.Tensor:
    """(V,) the target's sampling distribution after ``tokens``."""
    ids = torch.tensor(tokens)
    logits = target.forward(ids, torch.arange(len(tokens)), causal_visibility(0, len(tokens)), target.new_cache())
    return probabilities(logits[-1:], sampling)[0]


def exact_joint(target, sampling: SamplingParams) -> torch.Tensor:
    """(V, V) exact probability of the first two tokens under the target."""
    first = next_probs(target, PROMPT, sampling)
    joint = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    for x1 in range(VOCAB):
        if first[x1] > 0:
            joint[x1] = first[x1] * next_probs(target, PROMPT + [x1], sampling)
    return joint


def chi_square(counts: torch.Tensor, expected: torch.Tensor):
    """scipy's chi-square of observed ``counts`` against ``expected`` over the cells the target can
    produce, the cells expected below 5 pooled into one (chi-square needs >= 5 per cell)."""
    observed, wanted = counts[expected > 0], expected[expected > 0]
    rare = wanted < 5
    observed = torch.cat([observed[~rare], observed[rare].sum().view(1)])
    wanted = torch.cat([wanted[~rare], wanted[rare].sum().view(1)])
    if wanted[-1] == 0:
        observed, wanted = observed[:-1], wanted[:-1]
    return chisquare(observed.numpy(), wanted.numpy() * observed.sum().item() / wanted.sum().item()), int((~rare).sum())


def self_drafted(tmp_path):
    """A flat tiny target (float32, from a checkpoint) and its own layers in int4 as the draft,
    attending to the target's cache."""
    from specchat.model.loading import load_resident
    from specchat.model.selfdraft import build_self_draft
    from specchat.sources.facts import read_facts

    model = tiny_hf(0, arch="qwen2", vocab=VOCAB, layers=1, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.25)
    model.save_pretrained(tmp_path / "target")
    target = load_resident(tmp_path / "target").lm
    return target, build_self_draft(target, read_facts(tmp_path / "target"), "int4")


@pytest.mark.parametrize("method", ["specexec", "specexec-uncoupled", "specinfer"])
@pytest.mark.parametrize(
    "temperature, top_p, drafted_by", [(1.0, 1.0, "random"), (0.7, 0.9, "random"), (0.7, 0.9, "self:int4")]
)
def test_first_two_tokens_follow_the_target_distribution(method, temperature, top_p, drafted_by, tmp_path):
    """SpecExec draws by the request's shared noise (speculation/coupling.py) unless uncoupled."""
    if drafted_by == "random":
        target = tiny_lm(0, vocab=VOCAB, layers=1)
        draft = tiny_lm(1, vocab=VOCAB, layers=1)
        with torch.no_grad():  # a flatter target, so that many cells have mass
            target.lm_head.weight.mul_(0.25)
    else:
        target, draft = self_drafted(tmp_path)
    _assert_first_two_follow_the_target(target, draft, method, temperature, top_p)


def test_a_self_draft_with_a_shortlist_head_keeps_the_target_distribution(tmp_path):
    """The self draft's head as a shortlist (specchat.model.drafthead): an int4 copy ranks the 12
    tokens and the head itself scores the best 2 of each row, so q mixes the two heads' logits."""
    from specchat.model.drafthead import Shortlist
    from specchat.weights.lowbit import Int4Linear

    target, own = self_drafted(tmp_path)
    head = target.lm_head
    # The int4 kernel takes a multiple of 16 rows: the copy is of the 12 and 4 rows of zeros, cut off.
    padded = torch.nn.Linear(head.in_features, 16, bias=False)
    padded.weight.data = torch.cat([head.weight.detach(), torch.zeros(4, head.in_features)])
    shortlist = Shortlist(head, Int4Linear.quantize(padded, fit=False), shortlist=2)
    shortlist.copy = _FirstRows(shortlist.copy, VOCAB)
    draft = target.with_layers(own.layer_source, own.layer_dtype, True, shortlist)  # at every width
    _assert_first_two_follow_the_target(target, draft, "specexec", 0.7, 0.9)


class _FirstRows(torch.nn.Module):
    """``linear``'s first ``rows`` outputs."""

    def __init__(self, linear: torch.nn.Module, rows: int) -> None:
        super().__init__()
        self.linear, self.rows = linear, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)[..., : self.rows]


def _assert_first_two_follow_the_target(target, draft, method: str, temperature: float, top_p: float) -> None:
    speculators = {"specexec": SpecExec(coupled=False)} if method == "specexec-uncoupled" else SPECULATORS
    engine = Engine(target, draft, CharTokenizer(), [], speculators=speculators)
    method = method.removesuffix("-uncoupled")
    config = GenerationConfig(method=method, budget=6, draft_batch=3, max_new_tokens=2,
                              temperature=temperature, top_p=top_p, seed=1234)
    counts = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    generator = engine.generate  # one engine: the prompt's KV is reused on every draw
    torch.manual_seed(0)
    for draw in range(DRAWS):
        done = list(generator(PROMPT, GenerationConfig(**{**config.__dict__, "seed": 1234 + draw})))[-1]
        x1, x2 = done.token_ids
        counts[x1, x2] += 1
    expected = exact_joint(target, SamplingParams(temperature, top_p)) * DRAWS
    assert counts[expected == 0].sum() == 0, "a token outside the target's support was produced"
    result, cells = chi_square(counts, expected)
    assert result.pvalue > 0.01, (result, cells)


RESUMED_VOCAB = 6
RESUMED_DRAWS = 6_000


def exact_triples(target, sampling: SamplingParams, vocab: int) -> torch.Tensor:
    """(V, V, V) exact probability of the first three tokens under the target."""
    joint = torch.zeros(vocab, vocab, vocab, dtype=torch.float64)
    first = next_probs(target, PROMPT, sampling).double()
    for x1 in range(vocab):
        second = next_probs(target, PROMPT + [x1], sampling).double()
        for x2 in range(vocab):
            joint[x1, x2] = first[x1] * second[x2] * next_probs(target, PROMPT + [x1, x2], sampling).double()
    return joint


def test_trees_the_lookahead_began_keep_the_target_distribution():
    """SpecExec with the lookahead: at budget 1 the first pass verifies the draft's favourite
    x1 and draws x2, the bet won whenever x1 was that favourite, and x3 then comes from the
    tree the lookahead grew during the first pass (re-rooted at x2).  The joint of
    (x1, x2, x3) must still be the target's."""
    from specchat.speculation.lookahead import Lookahead

    target = tiny_lm(0, vocab=RESUMED_VOCAB, layers=1)
    with torch.no_grad():
        target.lm_head.weight.mul_(0.5)
    engine = Engine(target, target, CharTokenizer(), [], lookahead=Lookahead(patient=True))
    sampling = SamplingParams(0.8, 1.0)
    counts = torch.zeros(RESUMED_VOCAB, RESUMED_VOCAB, RESUMED_VOCAB, dtype=torch.float64)
    hits = 0
    for draw in range(RESUMED_DRAWS):
        config = GenerationConfig(budget=1, draft_batch=1, max_new_tokens=3, temperature=0.8, top_p=1.0, seed=99 + draw)
        done = list(engine.generate(PROMPT, config))[-1]
        x1, x2, x3 = done.token_ids[:3]
        counts[x1, x2, x3] += 1
        hits += done.stats.lookahead_hits
    assert hits > RESUMED_DRAWS // 10, hits  # resumed trees were a good share of the second passes
    expected = exact_triples(target, sampling, RESUMED_VOCAB) * RESUMED_DRAWS
    result, _ = chi_square(counts.flatten(), expected.flatten())
    assert result.pvalue > 0.01, (result, hits)
