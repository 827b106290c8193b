"""How often the greedy target picks the draft's favourite token, learned from verified passes.

With greedy decoding a tree node is accepted exactly when its token is the target's argmax.
SpecExec (arXiv 2406.02532) grows the tree by the draft's path probabilities, which
treats the draft's probability q1 of its favourite as the chance the target agrees.  That
chance can be far from q1: a draft made from the target itself picks the target's argmax at
~99% of positions even where q1 is 0.4 (the same logits, rounded), so a tree scored by q1
spends its budget on siblings the greedy target never takes, instead of going deep.

So greedy SpecExec trees are scored by the agreement measured so far.  For a draft row with
favourite probability q1 and other children q_r:

    a(q1)          = q1 * hits[b] / expected[b]          (b: q1's bin of :data:`BINS`; < 1)
    score(fav)     = log a(q1)
    score(rank r)  = log(1 - a(q1)) + log(q_r / (1 - q1))   (the rest, shared as the draft shares it)

hits[b] counts verified favourites the target took, expected[b] sums their q1; both start at
:data:`PRIOR` pseudo-observations of a calibrated draft, so an unmeasured draft is scored by
its own probabilities -- or, for a draft made from the target, of one whose favourite the target
takes at a rate :data:`SELF_DRAFT_RATE` whatever q1, so that its first trees already go deep
(with the calibrated prior they spent their first passes on siblings, and ``--budget auto``
measured its budgets on those bushy trees).  Only which tree is grown changes: verification, and so the output, is
the same whatever the scores.
"""

from __future__ import annotations

import torch

BINS = 10
PRIOR = 4.0  # pseudo-observations per bin, at the bin's middle
CEILING = 1.0 - 1e-6  # a favourite is never certain
# The demo target's int4 and int8 copies picked its argmax at 94-99.5% of positions (issue 19's
# table; session 27: every one of 48 greedy passes took the whole favourite chain).
SELF_DRAFT_RATE = 0.95


class GreedyAgreement:
    def __init__(self, prior_rate: float | None = None) -> None:
        """``prior_rate``: the agreement assumed until measured (None: the draft's own q1)."""
        middles = (torch.arange(BINS, dtype=torch.float64) + 0.5) / BINS
        self.hits = (middles if prior_rate is None else torch.full((BINS,), prior_rate, dtype=torch.float64)) * PRIOR  # (BINS,)
        self.expected = middles * PRIOR  # (BINS,)

    def _bins(self, q1: torch.Tensor) -> torch.Tensor:
        return (q1 * BINS).long().clamp(0, BINS - 1)

    def rate(self, q1: torch.Tensor) -> torch.Tensor:
        """(N,) chance the target picks a favourite drafted with probability ``q1`` (N,)."""
        bins = self._bins(q1)
        return (q1 * self.hits[bins] / self.expected[bins]).clamp(1e-12, CEILING)

    def observe(self, q1: float, hit: bool) -> None:
        """One verified favourite: drafted with probability ``q1``, taken by the target or not."""
        b = int(self._bins(torch.tensor(q1, dtype=torch.float64)))
        self.hits[b] += float(hit)
        self.expected[b] += q1

    def rescore(self, log_probs: torch.Tensor) -> torch.Tensor:
        """Children's scores (N, k) from the draft's log-probabilities (N, k), favourite first."""
        q1 = log_probs[:, 0].exp()  # (N,)
        agree = self.rate(q1)  # (N,)
        rest_of_draft = torch.log1p(-q1.clamp(max=1.0 - 1e-12))[:, None]  # (N, 1)
        share = (log_probs[:, 1:] - rest_of_draft).clamp_max(0.0)  # (N, k-1): log(q_r / (1 - q1))
        others = torch.log1p(-agree)[:, None] + share
        return torch.cat([agree.log()[:, None], others], dim=1).clamp_max(0.0)  # (N, k)
