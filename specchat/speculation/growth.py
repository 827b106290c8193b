"""Growing a speculation tree with the draft model.

SpecExec (arXiv 2406.02532, Sec. 3.2, Alg. 1 "parallel Dijkstra"): a node's
score is the draft's cumulative log-probability of the path to it.  Each step
takes the best ``batch`` nodes not yet expanded, runs one batched draft forward
over them, and offers all their children; the tree is the ``budget`` best
nodes found.  With calibrated step costs per width (``--draft-batch auto``),
each step picks the width with the most frontier probability per second
(:func:`choose_width`), and every step must pay for itself
(:meth:`GrowthParams.step_pays_off`).  Since a child never scores above its parent, the best-``budget``
set (ties broken by insertion order) is ancestor-closed, i.e. a tree.

SpecInfer (arXiv 2305.09781, Sec. 3): the tree is *sampled* from the draft.
Each expanded node draws its children without replacement from the draft
distribution q (Gumbel-top-k), and q is kept for verification.  Which nodes
get children depends only on their ancestors, never on the children drawn,
so multi-step speculative sampling stays exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from specchat.model.kvcache import KVCache
from specchat.model.lm import LanguageModel
from specchat.speculation.agreement import GreedyAgreement
from specchat.speculation.coupling import GumbelNoise
from specchat.speculation.sampling import GREEDY, SamplingParams, draft_top_log_scores, gumbel, probabilities
from specchat.speculation.tree import Tree, TreeBuilder


@dataclass(frozen=True)
class GrowthParams:
    budget: int  # tree nodes besides the root that the target verifies
    max_depth: int = 32  # no node deeper than this
    batch: int = 16  # nodes expanded per draft forward (SpecExec)
    max_steps: int = 64  # draft forwards per tree at most (SpecExec)
    # Measured costs (seconds) for the adaptive stop; None until the engine has timed a pass.
    draft_step_s: float | None = None
    target_pass_s: float | None = None
    # ((width, seconds of one draft forward over that many nodes), ...) ascending: when given,
    # each step picks its own width (:func:`choose_width`) instead of ``batch``.
    width_costs: tuple[tuple[int, float], ...] = ()
    # Greedy SpecExec: score children by how often the target has taken the draft's favourite
    # (:class:`GreedyAgreement`) instead of by the draft's probabilities.
    agreement: GreedyAgreement | None = None
    # Sampled SpecExec: rank children by the draft's logits perturbed with the request's shared
    # noise, as greedy growth ranks plain logits (speculation/coupling.py).
    noise: GumbelNoise | None = None

    def step_pays_off(self, frontier_mass: float, expected_tokens: float, draft_spent_s: float, step_s: float | None) -> bool:
        """Is one more draft step worth its time?

        Throughput is E / (T_target + D), D the draft time spent so far.  A step of
        t seconds over nodes of total path probability m adds at most m expected
        tokens, so it pays off while (E + m) / (T + D + t) > E / (T + D), i.e.
        m * (T + D) > E * t.
        """
        if step_s is None or self.target_pass_s is None:
            return True
        return frontier_mass * (self.target_pass_s + draft_spent_s) > expected_tokens * step_s


def choose_width(frontier_probs: list[float], width_costs: tuple[tuple[int, float], ...]) -> tuple[int, float]:
    """(width, its step seconds) with the most frontier mass per second of draft time.

    ``frontier_probs``: path probabilities of the expandable nodes, best first.  A step
    over the best w of them adds at most sum(p[:w]) expected tokens for cost(w) seconds;
    where a forward over more nodes costs little more (a GPU, a memory-bound draft) the
    widest step wins, where cost grows with w (a compute-bound CPU) a narrow one does.
    """
    cumulative, total = [], 0.0
    for p in frontier_probs:
        total += p
        cumulative.append(total)
    best = None
    for width, seconds in width_costs:
        usable = min(width, len(frontier_probs))
        value = cumulative[usable - 1] / max(seconds, 1e-12)
        if best is None or value > best[0]:
            best = (value, usable, seconds)
        if width >= len(frontier_probs):
            break  # wider steps expand the same nodes at a higher cost
    return best[1], best[2]


class GrowthStopped(Exception):
    """Raised from inside a draft forward (by a layer source) to end a growth at once."""


class Growth(NamedTuple):
    tree: Tree
    draft_forwards: int
    predicted_s: float = 0.0  # the calibrated seconds of the steps taken (auto width), for the engine's scale


def grow_specexec(
    draft: LanguageModel,
    cache: KVCache,
    committed: list[int],
    growth: GrowthParams,
    sampling: SamplingParams,
    choose: Callable[[list[float], tuple[tuple[int, float], ...]], tuple[int, float]] = choose_width,
    start: TreeBuilder | None = None,
    stop: Callable[[], bool] = lambda: False,
    spent_s: float = 0.0,
) -> Growth:
    """Best-first tree of ``growth.budget`` nodes, with its draft forwards (and their calibrated seconds);
    ``choose`` picks each step's width from the calibrated costs (:func:`choose_width`).

    ``start``: a tree already begun, whose root is expanded (:meth:`TreeBuilder.rooted_at`, a
    lookahead's subtree): growth goes on from it, and only the forwards made here count;
    ``spent_s``, what growing it so far would have cost, weighs in the adaptive stop as a fresh
    tree's own steps do (so a tree begun ahead grows as deep as a fresh one, sooner).
    ``stop`` is asked before every step; True ends the growth there (a forward that raises
    :class:`GrowthStopped` ends it too, its step undone)."""
    budget = growth.budget
    if start is not None:
        builder, predicted_s = start, 0.0
    else:
        builder = TreeBuilder(draft, cache, committed)
        # Draft seconds so far as the step costs predict them, starting with the root's forward (one node).
        root_s = growth.width_costs[0][1] if growth.width_costs else (growth.draft_step_s or 0.0)
        spent_s, predicted_s = root_s, (root_s if growth.width_costs else 0.0)
        if stop() or not _expand(builder, cache, [0], sampling, growth, threshold=-math.inf):
            return Growth(builder.finish([0]), 0)
    while builder.draft_forwards < growth.max_steps and not stop():
        threshold = _kth_best(builder.scores[1:], budget)
        frontier = [
            n
            for n in range(1, len(builder.tokens))
            if not builder.is_expanded(n)
            and builder.depths[n] < growth.max_depth
            and builder.scores[n] > threshold
        ]
        if not frontier:
            break
        frontier.sort(key=lambda n: (-builder.scores[n], n))
        if growth.width_costs:
            width, step_s = choose([math.exp(builder.scores[n]) for n in frontier], growth.width_costs)
        else:
            width, step_s = growth.batch, growth.draft_step_s
        nodes = frontier[:width]
        kept = _best_nodes(builder.scores, budget)[1:]
        expected = 1.0 + sum(math.exp(builder.scores[n]) for n in kept)  # draft's estimate of tokens per pass
        mass = sum(math.exp(builder.scores[n]) for n in nodes)
        if not growth.step_pays_off(mass, expected, spent_s, step_s) or not _expand(builder, cache, nodes, sampling, growth, threshold):
            break
        spent_s += step_s or 0.0
        predicted_s += step_s if growth.width_costs else 0.0
    return Growth(builder.finish(_best_nodes(builder.scores, budget)), builder.draft_forwards, predicted_s)


def _expand(builder: TreeBuilder, cache: KVCache, nodes: list[int], sampling: SamplingParams, growth: GrowthParams, threshold: float) -> bool:
    """One draft forward over ``nodes`` (``[0]``: the root, with the pending tokens), their children
    offered; False where the forward was stopped, its entries undone in every layer."""
    try:
        logits = builder.expand_root() if nodes == [0] else builder.expand(nodes)  # (B, V)
    except GrowthStopped:  # mid-forward: some layers hold this step's entries, the rest do not
        cache.crop(cache.length)
        return False
    scores, tokens = _child_scores(builder, nodes, logits, sampling, growth)  # (B, K) each
    _offer_children(builder, nodes, scores, tokens, growth.budget, threshold)
    return True


def _child_scores(
    builder: TreeBuilder, nodes: list[int], logits: torch.Tensor, sampling: SamplingParams, growth: GrowthParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best ``budget`` children of each expanded node: (log-scores (B, K), tokens (B, K))."""
    if growth.noise is not None and not sampling.greedy:
        indices = [builder.prefix_len + builder.depths[n] + 1 for n in nodes]  # each child's index in the conversation
        logits, sampling = growth.noise.draft_logits(logits, indices, sampling), GREEDY  # (B, V) log q + g
    log_probs, tokens = draft_top_log_scores(logits, sampling, growth.budget)
    builder.note_favourites(nodes, log_probs, tokens)
    if growth.agreement is not None:
        log_probs = growth.agreement.rescore(log_probs)
    return log_probs, tokens


def _offer_children(
    builder: TreeBuilder, nodes: list[int], log_scores: torch.Tensor, tokens: torch.Tensor, budget: int, threshold: float
) -> None:
    """Add the best ``budget`` children of ``nodes`` whose path score beats ``threshold``.

    log_scores, tokens: (B, K) each row's best K children (:func:`draft_top_log_scores`)."""
    parent_scores = torch.tensor([builder.scores[n] for n in nodes], dtype=torch.float64)
    path_scores = parent_scores[:, None] + log_scores  # (B, K)
    width = path_scores.shape[1]
    best, flat = path_scores.flatten().topk(min(budget, path_scores.numel()))
    child_tokens = tokens.flatten()[flat].tolist()  # one gather, not a tensor index per child
    for score, index, token in zip(best.tolist(), flat.tolist(), child_tokens):
        if score <= threshold or score == -math.inf:
            break  # topk is sorted: nothing further can enter the tree
        builder.add(nodes[index // width], token, score)


def _kth_best(scores: list[float], k: int) -> float:
    if len(scores) < k:
        return -math.inf
    return float(torch.tensor(scores, dtype=torch.float64).topk(k).values[-1])


def _best_nodes(scores: list[float], budget: int) -> list[int]:
    """Root plus the ``budget`` best nodes, ties going to the earlier (ancestor-first) node."""
    order = sorted(range(1, len(scores)), key=lambda n: (-scores[n], n))
    return [0] + order[:budget]


def specinfer_shape(budget: int) -> tuple[int, int]:
    """(children per expanded node, nodes expanded per level) for a budget.

    A binary fan-out over a frontier of about sqrt(budget) nodes: 16 nodes
    become a depth-4 tree, 256 nodes a depth-10 tree 32 wide.
    """
    width = max(1, round(math.sqrt(budget)))
    return (2 if width > 1 else 1), width


def grow_specinfer(
    draft: LanguageModel,
    cache: KVCache,
    committed: list[int],
    growth: GrowthParams,
    sampling: SamplingParams,
    generator: torch.Generator | None,
) -> Growth:
    """Level-by-level sampled tree of ``growth.budget`` nodes, with its draft forwards."""
    builder = TreeBuilder(draft, cache, committed)
    branch, width = specinfer_shape(growth.budget)
    remaining = growth.budget
    level, logits = [0], builder.expand_root()
    while remaining > 0:
        # Greedy: the draft's own top tokens (temperature 1); sampled: q as the target sees it.
        greedy_q = SamplingParams(temperature=1.0) if sampling.greedy else sampling
        draft_probs = probabilities(logits, greedy_q)  # (B, V) float64
        drawn_probs, drawn_tokens = _draw_rows_without_replacement(
            draft_probs, min(branch, remaining), None if sampling.greedy else generator
        )  # (B, k) each, draw order; probability 0 past a row's support
        next_level: list[int] = []
        for row, node in enumerate(level):
            builder.draft_probs[node] = draft_probs[row]
            row_probs, row_tokens = drawn_probs[row].tolist(), drawn_tokens[row].tolist()
            n_children = min(branch, remaining, sum(1 for prob in row_probs if prob > 0))
            for prob, token in zip(row_probs[:n_children], row_tokens[:n_children]):
                next_level.append(builder.add(node, token, builder.scores[node] + math.log(prob)))
            remaining -= n_children
            if remaining == 0:
                break
        if remaining == 0 or builder.depths[next_level[0]] >= growth.max_depth:
            break
        # Which nodes get children depends on their own path score only.
        next_level.sort(key=lambda n: (-builder.scores[n], n))
        level = next_level[:width]
        logits = builder.expand(level)
    return Growth(builder.finish(list(range(len(builder.tokens)))), builder.draft_forwards)


def _draw_rows_without_replacement(
    probs: torch.Tensor, count: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` distinct tokens per row of (B, V) ``probs``, in draw order (Gumbel-top-k).

    Returns (their probabilities, their token ids), both (B, count); a row with
    fewer than ``count`` tokens of non-zero probability ends in zeros.  Sorting
    log p + Gumbel noise is the same as drawing one token after another without
    replacement.  Only the top ``support`` tokens can ever be drawn (support: the
    longest row's count of non-zero tokens -- the nucleus, with top-p), so the
    noise is drawn over those alone: (B, support) instead of (B, V).  With no
    generator (greedy decoding) the most probable tokens are taken, in order.
    """
    count = min(count, probs.shape[-1])
    if count <= 0:
        return probs[:, :0], torch.zeros(probs.shape[0], 0, dtype=torch.long)
    if generator is None:
        return probs.topk(count, dim=-1)
    support = max(count, int((probs > 0).sum(dim=-1).max()))
    candidate_probs, candidate_tokens = probs.topk(support, dim=-1)  # (B, support)
    keys = candidate_probs.log() + gumbel(tuple(candidate_probs.shape), generator)  # -inf where p = 0: drawn last, never counted
    order = keys.topk(count, dim=-1).indices  # (B, count)
    return candidate_probs.gather(-1, order), candidate_tokens.gather(-1, order)
