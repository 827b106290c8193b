"""The speculation tree: a few flat tensors plus the bookkeeping to grow it with the draft.

Node 0 is the *root*: the last committed token, which neither model has
consumed yet.  Every other node is a guess for a continuation.  A node's
parent always has a smaller index, so index order is a topological order.

Tensors of a finished :class:`Tree` (N nodes, root included):
  tokens  (N,) long   token id per node
  parents (N,) long   parent index, -1 for the root
  depths  (N,) long   0 for the root
  scores  (N,) f64    log-score of the path root -> node (the draft's probabilities, or for
                      greedy SpecExec the measured agreement, speculation/agreement.py)
The target sees node i at absolute position ``prefix_len + depths[i]`` and may
attend to the cached prefix plus node i's ancestors and itself
(:meth:`Tree.ancestor_mask`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from specchat.model.kvcache import KVCache
from specchat.model.lm import LanguageModel, causal_visibility


@dataclass
class Tree:
    tokens: torch.Tensor  # (N,) long
    parents: torch.Tensor  # (N,) long, root = -1
    depths: torch.Tensor  # (N,) long
    scores: torch.Tensor  # (N,) float64, draft log-probability of the path to the node
    # For SpecInfer: the draft distribution (V,) each expanded node drew its children from.
    draft_probs: dict[int, torch.Tensor] = field(default_factory=dict)
    # Slot of each node in the draft cache, -1 where the draft has not consumed it.
    draft_slots: torch.Tensor | None = None
    # Per node the draft expanded: its favourite child token and that token's draft probability
    # (-1 and 0 elsewhere), to learn how often the target agrees (SpecExec).
    favourites: torch.Tensor | None = None  # (N,) long
    favourite_probs: torch.Tensor | None = None  # (N,) float64

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])

    def ancestor_mask(self) -> torch.Tensor:
        """(N, N) bool: [i, j] is True when j is i or an ancestor of i."""
        n = self.size
        mask = torch.zeros(n, n, dtype=torch.bool)
        mask[0, 0] = True
        # Fill level by level: a node's row is its parent's row plus itself.
        for depth in range(1, int(self.depths.max()) + 1 if n > 1 else 1):
            level = (self.depths == depth).nonzero().flatten()
            mask[level] = mask[self.parents[level]]
            mask[level, level] = True
        return mask

    def children(self) -> list[list[int]]:
        """Children of each node, in index order (= the order they were drawn)."""
        kids: list[list[int]] = [[] for _ in range(self.size)]
        for child, parent in enumerate(self.parents.tolist()):
            if parent >= 0:
                kids[parent].append(child)
        return kids

    def tokens_within(self, accepted: list[int], budgets: tuple[int, ...]) -> dict[int, int]:
        """Tokens the pass would have committed, per budget b, had the tree been only its b best nodes.

        SpecExec's tree is the ``budget`` best-scored nodes, ancestor-closed (a child never scores
        above its parent, ties go to the smaller index), so its b best nodes are the tree that
        budget b grows.  Along the accepted path ranks increase, so the path's nodes of rank < b
        are its first ones: the target would have taken those and then drawn one token itself.
        """
        if not budgets:
            return {}
        scores = self.scores.tolist()
        order = sorted(range(1, self.size), key=lambda node: (-scores[node], node))
        rank = {node: i for i, node in enumerate(order)}
        return {b: 1 + sum(rank[node] < b for node in accepted) for b in budgets}


class TreeBuilder:
    """Grows a tree with the draft, reusing the draft's KV for every consumed node.

    The draft cache holds the committed prefix and then one slot per consumed
    tree node, in the order the nodes were consumed.  A node is consumed
    ("expanded") by one batched draft forward that yields its children's
    log-scores; its ancestors were all consumed earlier, so their KV is there.
    """

    def __init__(self, draft: LanguageModel, cache: KVCache, committed: list[int]) -> None:
        self.draft = draft
        self.cache = cache
        self.prefix_len = len(committed) - 1  # root sits at this position
        self.tokens: list[int] = [committed[-1]]
        self.parents: list[int] = [-1]
        self.depths: list[int] = [0]
        self.scores: list[float] = [0.0]
        self.slots: list[int] = [-1]
        self.favourites: list[int] = [-1]
        self.favourite_probs: list[float] = [0.0]
        self.draft_probs: dict[int, torch.Tensor] = {}
        self.draft_forwards = 0
        self._pending = committed[cache.length :]  # tokens the draft has not seen, root last

    @classmethod
    def rooted_at(
        cls, draft: LanguageModel, cache: KVCache, committed: list[int], tree: Tree, node: int, new_slot: dict[int, int]
    ) -> TreeBuilder:
        """A builder that starts from ``tree``'s subtree at ``node``, now the root (``committed[-1]``).

        ``node`` and its expanded descendants already have draft KV: ``new_slot`` maps each of
        their slots in ``tree`` to its slot in ``cache`` now (the root's is ``len(committed) - 1``).
        Path scores become relative to the new root, depths too; nothing is pending."""
        builder = cls(draft, cache, committed)  # committed[-1] is the node's token
        builder._pending = []
        inside = {node: 0}  # old index -> new index, for node and its descendants
        parents, tokens = tree.parents.tolist(), tree.tokens.tolist()
        base_score = float(tree.scores[node])
        builder.slots[0] = new_slot[int(tree.draft_slots[node])]
        builder.favourites[0], builder.favourite_probs[0] = int(tree.favourites[node]), float(tree.favourite_probs[node])
        for old in range(node + 1, tree.size):  # parents come before children
            parent = parents[old]
            if parent not in inside:
                continue
            new = builder.add(inside[parent], tokens[old], float(tree.scores[old]) - base_score)
            inside[old] = new
            slot = int(tree.draft_slots[old])
            builder.slots[new] = new_slot[slot] if slot >= 0 else -1
            builder.favourites[new], builder.favourite_probs[new] = int(tree.favourites[old]), float(tree.favourite_probs[old])
        return builder

    def add(self, parent: int, token: int, score: float) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(self.depths[parent] + 1)
        self.scores.append(score)
        self.slots.append(-1)
        self.favourites.append(-1)
        self.favourite_probs.append(0.0)
        return len(self.tokens) - 1

    def note_favourites(self, nodes: list[int], log_probs: torch.Tensor, tokens: torch.Tensor) -> None:
        """Record each expanded node's favourite child: log_probs, tokens (B, k), best first."""
        for node, log_prob, token in zip(nodes, log_probs[:, 0].tolist(), tokens[:, 0].tolist()):
            self.favourites[node], self.favourite_probs[node] = token, math.exp(log_prob)

    def expand_root(self) -> torch.Tensor:
        """Feed the draft every committed token it has not seen; return root logits (1, V)."""
        start = self.cache.length
        pending = torch.tensor(self._pending, dtype=torch.long)
        positions = torch.arange(start, start + len(self._pending))
        visible = causal_visibility(start, len(self._pending))
        last = torch.tensor([len(self._pending) - 1])
        logits = self.draft.forward(pending, positions, visible, self.cache, logit_rows=last)
        self.slots[0] = self.cache.length - 1
        self.draft_forwards += 1
        return logits  # (1, V)

    def expand(self, nodes: list[int]) -> torch.Tensor:
        """One batched draft forward over ``nodes``; returns their logits (B, V)."""
        base = self.cache.length
        batch = len(nodes)
        visible = torch.zeros(batch, base + batch, dtype=torch.bool)
        visible[:, : self.prefix_len] = True
        for row, node in enumerate(nodes):
            ancestor = self.parents[node]
            while ancestor >= 0:
                visible[row, self.slots[ancestor]] = True
                ancestor = self.parents[ancestor]
            visible[row, base + row] = True
        ids = torch.tensor([self.tokens[n] for n in nodes], dtype=torch.long)
        positions = torch.tensor([self.prefix_len + self.depths[n] for n in nodes], dtype=torch.long)
        logits = self.draft.forward(ids, positions, visible, self.cache)  # (B, V)
        for row, node in enumerate(nodes):
            self.slots[node] = base + row
        self.draft_forwards += 1
        return logits

    def is_expanded(self, node: int) -> bool:
        return self.slots[node] >= 0

    def finish(self, keep: list[int]) -> Tree:
        """Build the :class:`Tree` of the nodes in ``keep`` (root included, ancestor-closed)."""
        keep = sorted(keep)
        new_index = {old: new for new, old in enumerate(keep)}
        parents = [new_index[self.parents[n]] if n else -1 for n in keep]
        return Tree(
            tokens=torch.tensor([self.tokens[n] for n in keep], dtype=torch.long),
            parents=torch.tensor(parents, dtype=torch.long),
            depths=torch.tensor([self.depths[n] for n in keep], dtype=torch.long),
            scores=torch.tensor([self.scores[n] for n in keep], dtype=torch.float64),
            draft_probs={new_index[n]: p for n, p in self.draft_probs.items() if n in new_index},
            draft_slots=torch.tensor([self.slots[n] for n in keep], dtype=torch.long),
            favourites=torch.tensor([self.favourites[n] for n in keep], dtype=torch.long),
            favourite_probs=torch.tensor([self.favourite_probs[n] for n in keep], dtype=torch.float64),
        )
