import pytest
import torch

from specchat.speculation.sampling import SamplingParams, probabilities, top_p_filter


@pytest.mark.parametrize(
    "probs, top_p, kept",
    [
        ([0.5, 0.3, 0.15, 0.05], 0.5, [0]),  # the top token alone reaches 0.5
        ([0.5, 0.3, 0.15, 0.05], 0.6, [0, 1]),
        ([0.5, 0.3, 0.15, 0.05], 0.8, [0, 1]),  # 0.5 + 0.3 reaches 0.8 exactly
        ([0.5, 0.3, 0.15, 0.05], 0.81, [0, 1, 2]),
        ([0.05, 0.15, 0.3, 0.5], 0.6, [2, 3]),  # order in the vocabulary does not matter
        ([0.5, 0.3, 0.15, 0.05], 1.0, [0, 1, 2, 3]),
        ([0.9, 0.1], 0.01, [0]),  # the most likely token is always kept
    ],
)
def test_top_p_keeps_the_smallest_most_probable_set(probs, top_p, kept):
    filtered = top_p_filter(torch.tensor([probs], dtype=torch.float64), top_p)[0]
    assert (filtered > 0).nonzero().flatten().tolist() == kept
    expected = torch.tensor(probs, dtype=torch.float64)[kept]
    assert torch.allclose(filtered[kept], expected / expected.sum())


def test_greedy_is_one_hot_on_the_argmax():
    probs = probabilities(torch.tensor([[0.1, 3.0, -1.0]]), SamplingParams(0.0))
    assert probs.tolist() == [[0.0, 1.0, 0.0]]


def test_temperature_sharpens():
    logits = torch.tensor([[1.0, 2.0]])
    hot = probabilities(logits, SamplingParams(2.0))[0, 1]
    cold = probabilities(logits, SamplingParams(0.5))[0, 1]
    assert cold > hot > 0.5


@pytest.mark.parametrize("temperature, top_p", [(-0.1, 1.0), (1.0, 0.0), (1.0, 1.5), (float("nan"), 1.0)])
def test_bad_sampling_parameters_are_refused(temperature, top_p):
    with pytest.raises(ValueError):
        SamplingParams(temperature, top_p)


def _top_p_by_full_sort(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The reference: rank the whole vocabulary."""
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    keep_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) < top_p
    kept = probs * torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return kept / kept.sum(dim=-1, keepdim=True)


@pytest.mark.parametrize("sharpness", [0.01, 0.3, 1.0, 4.0])  # near-flat rows need the search to widen to V
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.999])
def test_top_p_over_the_top_k_equals_a_full_sort(sharpness, top_p):
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(6, 5000, generator=generator, dtype=torch.float64) * sharpness
    probs = torch.softmax(logits, dim=-1)
    assert torch.equal(top_p_filter(probs, top_p) > 0, _top_p_by_full_sort(probs, top_p) > 0)
    assert torch.allclose(top_p_filter(probs, top_p), _top_p_by_full_sort(probs, top_p), rtol=0, atol=1e-15)


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(0.7, 0.9), SamplingParams(1.0, 0.5), SamplingParams(0.3, 0.999)])
@pytest.mark.parametrize("k", [1, 7, 64, 300])
def test_the_top_k_draft_scores_are_the_full_scores_best_k(params, k):
    from specchat.speculation.sampling import draft_log_scores, draft_top_log_scores

    torch.manual_seed(k)
    logits = torch.randn(5, 300) * 4  # (N, V)
    full = draft_log_scores(logits, params)  # (N, V) float64
    scores, tokens = draft_top_log_scores(logits, params, k)
    assert scores.shape == tokens.shape == (5, min(k, 300)) and scores.dtype == torch.float64
    expected = full.topk(min(k, 300), dim=-1).values
    finite = expected > -torch.inf
    assert torch.equal(scores > -torch.inf, finite)  # the same tokens inside the nucleus
    assert torch.allclose(scores[finite], expected[finite], atol=1e-5)
    assert torch.allclose(full.gather(-1, tokens)[finite], scores[finite], atol=1e-5)  # each score is its token's


@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.5])
def test_top_k_draft_scores_never_exceed_zero_so_children_never_outscore_parents(top_p):
    """A peaked row whose nucleus is one token scores it log(p / p): exactly 0, never above
    (a child above its parent broke the tree's ancestor closure in a t=0.6 sweep)."""
    from specchat.speculation.sampling import draft_top_log_scores

    torch.manual_seed(3)
    logits = torch.randn(64, 1000)
    logits[torch.arange(64), torch.randint(0, 1000, (64,))] += torch.linspace(5, 40, 64)  # ever more peaked rows
    scores, _ = draft_top_log_scores(logits, SamplingParams(0.6, top_p), 16)
    assert bool((scores <= 0).all())


def test_specexec_growth_with_a_peaked_sampled_draft_keeps_a_tree():
    from specchat.speculation.growth import GrowthParams, grow_specexec

    from tiny import tiny_lm

    draft = tiny_lm(1)
    with torch.no_grad():
        draft.lm_head.weight.mul_(20.0)  # nuclei of one token almost everywhere
    for budget in (4, 16, 64):
        tree = grow_specexec(draft, draft.new_cache(), [1, 2, 3], GrowthParams(budget, batch=4), SamplingParams(0.6, 0.9)).tree
        parents = tree.parents.tolist()
        assert all(parent < node for node, parent in enumerate(parents) if node)  # ancestor-closed, parents first
