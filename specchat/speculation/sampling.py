"""Turning logits into the distribution we sample from: temperature, then nucleus (top-p).

Both the target and the draft go through the same :func:`probabilities`, so
the speculative methods compare like with like.  Temperature 0 means greedy:
the distribution is one-hot on the argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams()

NUCLEUS_SEARCH = 64  # candidates ranked first; widened x4 while some row's nucleus is longer


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep, per row, the smallest set of most probable tokens whose mass reaches ``top_p``.

    probs: (N, V), rows summing to 1.  Returns renormalised (N, V).
    A token is kept when the mass of the tokens ranked strictly above it is
    still below ``top_p`` -- so the most probable token is always kept.

    Only the top k tokens are ranked (``topk``, not a full sort of the
    vocabulary: ~50x cheaper for V = 152k), k growing until every row's
    nucleus ends inside them -- i.e. until the k-th token of every row is
    already excluded, or k = V.  The result equals a full sort's.
    """
    if top_p >= 1.0:
        return probs
    vocab = probs.shape[-1]
    k = min(NUCLEUS_SEARCH, vocab)
    while True:
        ranked, order = probs.topk(k, dim=-1)  # (N, k) descending
        mass_before = ranked.cumsum(dim=-1) - ranked  # (N, k) exclusive prefix sums
        if k == vocab or bool((mass_before[:, -1] >= top_p).all()):
            break
        k = min(k * 4, vocab)
    keep_ranked = mass_before < top_p  # (N, k)
    keep = torch.zeros(probs.shape, dtype=torch.bool, device=probs.device).scatter_(-1, order, keep_ranked)
    kept = probs * keep
    return kept / kept.sum(dim=-1, keepdim=True)


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(N, V) logits -> (N, V) float64 sampling distribution."""
    logits = logits.double()
    if params.greedy:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    probs = torch.softmax(logits / params.temperature, dim=-1)
    return top_p_filter(probs, params.top_p)


def draft_log_scores(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(N, V) draft logits -> (N, V) log-probabilities used to rank tree nodes.

    Greedy decoding still ranks by the draft's full distribution (temperature
    1): a one-hot score would make every tree a chain.
    """
    temperature = params.temperature if params.temperature > 0 else 1.0
    log_probs = torch.log_softmax(logits.double() / temperature, dim=-1)
    if params.top_p < 1.0 and not params.greedy:
        log_probs = top_p_filter(log_probs.exp(), params.top_p).log()
    return log_probs


def draft_top_log_scores(logits: torch.Tensor, params: SamplingParams, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best children per row under :func:`draft_log_scores`, without scoring the whole vocabulary.

    Returns (log-probabilities (N, k) float64, descending; token ids (N, k)); -inf marks a token
    outside the nucleus.  A child ranked below k in its row can never be among the k best children
    of all rows together, so growing a tree of k nodes needs no more.  The normaliser is one
    float32 logsumexp per row; only the N x k candidates are taken to float64 (for N = 32 rows of
    a 152k vocabulary that is ~4x cheaper than the full float64 log-softmax).  With top-p the
    candidates widen (x4) until every row's nucleus ends inside them, so its renormalising mass is
    the nucleus's own, as in :func:`top_p_filter`.
    """
    temperature = params.temperature if params.temperature > 0 else 1.0
    scaled = logits.float() / temperature  # (N, V)
    vocab = scaled.shape[-1]
    log_norm = torch.logsumexp(scaled, dim=-1, keepdim=True).double()  # (N, 1)
    nucleus = params.top_p < 1.0 and not params.greedy
    width = min(max(k, NUCLEUS_SEARCH if nucleus else k), vocab)
    while True:
        ranked, tokens = scaled.topk(width, dim=-1)  # (N, width) descending
        log_probs = ranked.double() - log_norm  # (N, width)
        if not nucleus:
            break
        probs = log_probs.exp()
        mass_before = probs.cumsum(dim=-1) - probs  # (N, width) exclusive prefix sums
        if width == vocab or bool((mass_before[:, -1] >= params.top_p).all()):
            keep = mass_before < params.top_p
            kept_mass = (probs * keep).sum(dim=-1, keepdim=True)  # (N, 1): the whole nucleus
            log_probs = torch.where(keep, log_probs - kept_mass.log(), torch.full_like(log_probs, -torch.inf))
            break
        width = min(width * 4, vocab)
    k = min(k, vocab)
    # <= 0 exactly: a child must never outscore its parent (or the best-K set is no longer a tree);
    # log(p / p) of a one-token nucleus can round to +1e-16 on the way through exp and log.
    return log_probs[:, :k].clamp_max(0.0), tokens[:, :k]


def gumbel(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Gumbel(0, 1) noise of ``shape``, float64: -log(-log U), U uniform on (0, 1)."""
    uniform = torch.rand(shape, dtype=torch.float64, generator=generator)
    return -torch.log(-torch.log(uniform.clamp_min(1e-300)))


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """Draw one token id from a (V,) distribution."""
    return int(torch.multinomial(probs, 1, generator=generator))
