"""Tree invariants of both growth methods, on tiny random models."""

import copy
import threading

import pytest
import torch

from specchat.speculation.growth import GrowthParams, grow_specexec, grow_specinfer
from specchat.model.lm import causal_visibility
from specchat.speculation.lookahead import StoppableLayers, favourite_chain, reroot
from specchat.speculation.sampling import SamplingParams
from specchat.speculation.tree import Tree
from specchat.speculation.verify import target_tree_logits

from tiny import tiny_lm

COMMITTED = [3, 1, 4, 1, 5]


def grow(method: str, budget: int, sampling: SamplingParams, seed: int = 0):
    draft = tiny_lm(seed)
    cache = draft.new_cache()
    growth = GrowthParams(budget=budget, max_depth=6, batch=4)
    if method == "specexec-width":  # each step picks its width from (made-up) calibrated costs
        growth = GrowthParams(budget=budget, max_depth=6, batch=4, width_costs=((1, 1.0), (4, 1.2), (16, 2.0)))
        method = "specexec"
    if method == "specexec":
        tree = grow_specexec(draft, cache, COMMITTED, growth, sampling).tree
    else:
        tree = grow_specinfer(draft, cache, COMMITTED, growth, sampling, torch.Generator().manual_seed(seed)).tree
    return tree, draft, cache


CASES = [(m, b, s) for m in ("specexec", "specexec-width", "specinfer") for b in (1, 5, 16, 40) for s in (SamplingParams(0.0), SamplingParams(1.0, 0.9))]


@pytest.mark.parametrize("method, budget, sampling", CASES)
def test_tree_invariants(method, budget, sampling):
    tree, draft, cache = grow(method, budget, sampling)
    n = tree.size
    assert n == budget + 1  # the root plus exactly the budget
    parents, depths = tree.parents.tolist(), tree.depths.tolist()
    assert parents[0] == -1 and depths[0] == 0
    for node in range(1, n):
        assert 0 <= parents[node] < node  # connected, index order is topological
        assert depths[node] == depths[parents[node]] + 1
        assert tree.scores[node] <= tree.scores[parents[node]] + 1e-12  # scores never rise along a path
        assert depths[node] <= 6
    mask = tree.ancestor_mask()
    for i in range(n):
        ancestors, node = {i}, i
        while parents[node] >= 0:
            node = parents[node]
            ancestors.add(node)
        assert set(mask[i].nonzero().flatten().tolist()) == ancestors
    # Siblings hold distinct tokens (children are drawn without replacement).
    for kids in tree.children():
        tokens = [int(tree.tokens[k]) for k in kids]
        assert len(tokens) == len(set(tokens))


def test_specexec_keeps_the_best_nodes():
    tree, *_ = grow("specexec", 16, SamplingParams(0.0))
    # No node outside the tree may beat the worst node inside: re-growing with a bigger budget
    # keeps every node of the smaller tree.
    bigger, *_ = grow("specexec", 40, SamplingParams(0.0))
    paths = lambda t: {tuple(path(t, i)) for i in range(t.size)}
    assert paths(tree) <= paths(bigger)


def path(tree, node):
    tokens = []
    while node > 0:
        tokens.append(int(tree.tokens[node]))
        node = int(tree.parents[node])
    return tokens[::-1]


def test_tree_positions_and_mask_give_each_node_its_own_path_logits():
    """Target logits of node i in one tree pass == a plain forward over prefix + path(i)."""
    tree, *_ = grow("specexec", 12, SamplingParams(0.0))
    target = tiny_lm(9)
    cache = target.new_cache()
    prefix = COMMITTED[:-1]
    target.forward(torch.tensor(prefix), torch.arange(len(prefix)), causal_visibility(0, len(prefix)), cache)
    logits = target_tree_logits(target, cache, tree)
    for node in range(tree.size):
        sequence = COMMITTED + path(tree, node)
        fresh = target.forward(torch.tensor(sequence), torch.arange(len(sequence)), causal_visibility(0, len(sequence)), target.new_cache())
        assert torch.allclose(logits[node], fresh[-1], atol=1e-9)


@pytest.mark.parametrize(
    "probs, costs, expected",
    [
        ([0.5, 0.2, 0.1, 0.05], ((1, 1.0), (2, 1.0), (4, 1.0)), (4, 1.0)),  # flat cost (a GPU): widest
        ([0.9, 0.01, 0.01, 0.01], ((1, 1.0), (2, 2.0), (4, 4.0)), (1, 1.0)),  # cost ~ width, mass in one node
        ([0.3, 0.3, 0.3, 0.05], ((1, 1.0), (2, 1.5), (4, 3.0)), (2, 1.5)),  # 0.3/1 < 0.6/1.5 > 0.95/3
        ([0.4, 0.3], ((1, 1.0), (8, 1.1), (32, 5.0)), (2, 1.1)),  # no wider than the frontier
    ],
)
def test_choose_width_maximises_frontier_mass_per_second(probs, costs, expected):
    from specchat.speculation.growth import choose_width

    assert choose_width(probs, costs) == expected


def test_a_step_pays_off_only_while_it_adds_more_than_it_costs():
    growth = GrowthParams(budget=64, target_pass_s=1.0)
    # throughput E / (T + D): 2 tokens in 1.5 s; a 0.1 s step adding m tokens pays off iff m * 1.5 > 2 * 0.1
    assert growth.step_pays_off(0.2, 2.0, 0.5, 0.1)
    assert not growth.step_pays_off(0.1, 2.0, 0.5, 0.1)
    assert GrowthParams(budget=64).step_pays_off(0.0, 2.0, 0.5, 0.1)  # no target time measured yet: keep growing


def test_batched_gumbel_draws_follow_sequential_sampling_without_replacement():
    """The (first, second) children drawn per row follow p_a * p_b / (1 - p_a), rows independent."""
    from scipy.stats import chisquare

    from specchat.speculation.growth import _draw_rows_without_replacement

    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0, 0.0], [0.1, 0.0, 0.6, 0.3, 0.0]], dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    trials = 6000
    counts = [dict() for _ in probs]
    for _ in range(trials):
        drawn_probs, drawn_tokens = _draw_rows_without_replacement(probs, 2, generator)
        for row in range(len(probs)):
            pair = tuple(drawn_tokens[row].tolist())
            assert torch.equal(drawn_probs[row], probs[row, drawn_tokens[row]])
            counts[row][pair] = counts[row].get(pair, 0) + 1
    for row, row_counts in enumerate(counts):
        p = probs[row].tolist()
        pairs = [(a, b) for a in range(5) for b in range(5) if a != b and p[a] > 0 and p[b] > 0]
        assert set(row_counts) <= set(pairs)  # never a zero-probability token, never a repeat
        expected = [trials * p[a] * p[b] / (1 - p[a]) for a, b in pairs]
        assert chisquare([row_counts.get(pair, 0) for pair in pairs], expected).pvalue > 0.01


def test_batched_draws_stop_at_a_row_support():
    from specchat.speculation.growth import _draw_rows_without_replacement

    probs = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    drawn_probs, drawn_tokens = _draw_rows_without_replacement(probs, 3, torch.Generator().manual_seed(1))
    assert drawn_probs[0].tolist()[0] == 1.0 and drawn_probs[0].tolist()[1:] == [0.0, 0.0]
    assert sorted(drawn_tokens[1].tolist()[:2]) == [0, 1] and drawn_probs[1].tolist()[2] == 0.0
    greedy_probs, greedy_tokens = _draw_rows_without_replacement(probs, 2, None)
    assert greedy_tokens[0].tolist()[0] == 0 and greedy_probs[1].tolist() == [0.5, 0.5]


def test_the_favourite_chain_follows_each_nodes_favourite_child_while_the_tree_holds_it():
    tree = Tree(
        tokens=torch.tensor([9, 5, 6, 7, 8]), parents=torch.tensor([-1, 0, 0, 1, 1]), depths=torch.tensor([0, 1, 1, 2, 2]),
        scores=torch.zeros(5, dtype=torch.float64), favourites=torch.tensor([6, -1, -1, -1, -1]),
    )
    assert favourite_chain(tree) == [2]  # the root's favourite is 6 (node 2), which was never expanded
    tree.favourites = torch.tensor([5, 8, -1, -1, 3])
    assert favourite_chain(tree) == [1, 4]  # 5, then 8, whose favourite 3 is not in the tree
    tree.favourites = torch.tensor([4, -1, -1, -1, -1])
    assert favourite_chain(tree) == []


@pytest.mark.parametrize("seed", [0, 1])
def test_a_tree_rooted_at_a_child_of_a_grown_tree_reuses_its_draft_entries_exactly(seed):
    """The lookahead's re-rooting: the subtree's keys and values move behind the new committed
    prefix, and a node expanded afterwards sees exactly what a fresh forward over its path sees."""
    draft = tiny_lm(seed)  # float64
    with torch.no_grad():  # confident enough to grow a tree deeper than one level
        draft.lm_head.weight.mul_(4.0)
    cache = draft.new_cache()
    grown = grow_specexec(draft, cache, COMMITTED, GrowthParams(budget=14, max_depth=6, batch=2), SamplingParams(0.0)).tree
    kids = grown.children()
    child = next(c for c in kids[0] if grown.draft_slots[c] >= 0 and kids[c])
    committed = COMMITTED + [int(grown.tokens[child])]
    ahead = reroot(grown, draft, cache, len(COMMITTED), int(grown.tokens[child]), committed)
    builder = ahead.builder
    assert ahead.tokens == tuple(committed) and builder.tokens[0] == committed[-1] and builder.slots[0] == len(COMMITTED)
    assert cache.length == len(COMMITTED) + sum(s >= 0 for s in builder.slots)
    leaves = [n for n in range(1, len(builder.tokens)) if not builder.is_expanded(n)]
    assert leaves and builder.draft_forwards == 0
    for leaf in leaves:
        path, node = [], leaf
        while node > 0:
            path.insert(0, builder.tokens[node])
            node = builder.parents[node]
        sequence = committed + path
        fresh = draft.forward(torch.tensor(sequence), torch.arange(len(sequence)), causal_visibility(0, len(sequence)), draft.new_cache())
        assert torch.allclose(builder.expand([leaf])[0], fresh[-1], atol=1e-9)


def test_a_growth_stopped_inside_a_forward_undoes_that_step_and_keeps_the_tree_grown_so_far():
    """The lookahead ends its forward at the next layer once the target is done: the step is
    undone in every layer of the cache and the tree is what the steps before it grew."""
    draft, stop = tiny_lm(0), threading.Event()

    class StopsInForward:  # sets ``stop`` after the first layer of the ``at``-th forward
        def __init__(self, source, at: int) -> None:
            self.source, self.at, self.forwards = source, at, 0

        def layers(self):
            self.forwards += 1
            for index, layer in enumerate(self.source.layers()):
                yield layer
                if self.forwards == self.at and index == 0:
                    stop.set()

    stoppable = copy.copy(draft)
    stoppable.layer_source = StoppableLayers(StopsInForward(draft.layer_source, at=4), stop)
    cache = draft.new_cache()
    grown = grow_specexec(stoppable, cache, COMMITTED, GrowthParams(budget=20, max_depth=6, batch=2), SamplingParams(0.0), stop=stop.is_set)
    assert grown.draft_forwards == 3 and stop.is_set()
    expanded = int((grown.tree.draft_slots >= 0).sum())
    assert cache.length == len(COMMITTED) - 1 + expanded and len(set(cache._lengths)) == 1
    assert 1 <= expanded <= 1 + 2 * 2 and all(int(p) < i for i, p in enumerate(grown.tree.parents.tolist()) if i)


@pytest.mark.parametrize("small", [1, 3, 8, 16])
def test_tokens_within_a_smaller_budget_are_those_its_own_tree_would_have_given(small):
    """A pass at K reports, for a smaller budget b, the tokens had the tree been its b best nodes:
    for every path of the big tree, 1 + the length of its prefix that budget b's own tree holds."""
    tree, *_ = grow("specexec", 40, SamplingParams(0.0))
    smaller, *_ = grow("specexec", small, SamplingParams(0.0))
    held = {tuple(path(smaller, i)) for i in range(smaller.size)}
    for node in range(1, tree.size):
        nodes = []
        while node > 0:
            nodes.append(node)
            node = int(tree.parents[node])
        nodes.reverse()
        tokens = [int(tree.tokens[n]) for n in nodes]
        prefix = max(d for d in range(len(tokens) + 1) if tuple(tokens[:d]) in held)
        assert tree.tokens_within(nodes, (small, 40)) == {small: 1 + prefix, 40: 1 + len(nodes)}
