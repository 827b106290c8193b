"""Verifying a speculation tree with one target forward, and walking it.

Both walks start at the root and return the accepted node indices (root
excluded) plus one more token drawn from the target, so every pass yields at
least one new token.
"""

from __future__ import annotations

import torch

from specchat.model.kvcache import KVCache
from specchat.model.lm import LanguageModel
from specchat.speculation.coupling import GumbelNoise, sample_coupled
from specchat.speculation.sampling import SamplingParams, probabilities, sample
from specchat.speculation.tree import Tree


def target_tree_logits(target: LanguageModel, cache: KVCache, tree: Tree) -> torch.Tensor:
    """One target forward over every tree node; (N, V) logits.

    The cache holds the committed prefix (all but the root); node i sits at
    position prefix + depth_i and sees the prefix, its ancestors and itself.
    """
    prefix = cache.length
    visible = torch.cat(
        [torch.ones(tree.size, prefix, dtype=torch.bool), tree.ancestor_mask()], dim=1
    )  # (N, prefix + N)
    return target.forward(tree.tokens, prefix + tree.depths, visible, cache)


def walk_specexec(
    tree: Tree, logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None,
    noise: GumbelNoise | None = None, first_index: int = 0,
) -> tuple[list[int], int]:
    """SpecExec verification (arXiv 2406.02532, Sec. 3.2).

    At each visited node draw x ~ p_target(. | path) (argmax when greedy); if
    some child holds x, move there, else stop.  The result is an ancestral
    sample from the target, so the output distribution is exactly the target's.
    With ``noise`` the draw at a node of depth d is argmax log p + g_i, i = ``first_index`` + d
    (the conversation index of the token it draws; speculation/coupling.py), else from ``generator``.
    """
    children = tree.children()
    tokens = tree.tokens.tolist()
    greedy_choice = logits.argmax(-1).tolist() if sampling.greedy else None
    depths = tree.depths.tolist()
    node, accepted = 0, []
    while True:
        if greedy_choice is not None:
            drawn = greedy_choice[node]
        elif noise is not None:
            drawn = sample_coupled(logits[node : node + 1], sampling, noise, first_index + depths[node])
        else:
            drawn = sample(probabilities(logits[node : node + 1], sampling)[0], generator)
        child = next((c for c in children[node] if tokens[c] == drawn), None)
        if child is None:
            return accepted, drawn
        accepted.append(child)
        node = child


def walk_specinfer(
    tree: Tree, logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None
) -> tuple[list[int], int]:
    """Multi-step speculative sampling (arXiv 2305.09781, Sec. 4.2, Alg. 2).

    At a node with target distribution p and children x_1..x_m drawn from q
    without replacement: accept x_i with probability min(1, p(x_i)/q(x_i));
    on rejection p <- norm(max(p - q, 0)) and q <- q without x_i, renormalised
    (so a rejected token can never come back); if every child fails, draw the
    next token from the final residual p.
    """
    if sampling.greedy:
        return walk_specexec(tree, logits, sampling, generator)
    children = tree.children()
    tokens = tree.tokens.tolist()
    node, accepted = 0, []
    while True:
        p = probabilities(logits[node : node + 1], sampling)[0]  # (V,) float64
        if not children[node]:
            return accepted, sample(p, generator)
        q = tree.draft_probs[node].clone()  # (V,) float64
        next_node = None
        for child in children[node]:
            token = tokens[child]
            u = float(torch.rand((), dtype=torch.float64, generator=generator))
            if q[token] > 0 and u * q[token] < p[token]:  # u < p/q without dividing
                next_node = child
                break
            residual = (p - q).clamp_min(0)
            p = residual / residual.sum() if residual.sum() > 0 else p
            q[token] = 0
            if q.sum() <= 0:
                break
            q = q / q.sum()
        if next_node is None:
            return accepted, sample(p, generator)
        accepted.append(next_node)
        node = next_node
