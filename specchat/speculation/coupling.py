"""Sampling by shared noise: the target's sampled token and the draft's guess of it made equal
wherever the two distributions are close (Gumbel-max coupling, Daliri et al., arXiv 2408.07978).

The Gumbel-max trick: with g(x) drawn i.i.d. from Gumbel(0, 1) for every token x,

    argmax_x  log p(x) + g(x)   ~   p

so a token sampled from the target's distribution p at conversation index i (temperature and
top-p applied, :func:`~specchat.speculation.sampling.probabilities`) is the argmax of
log p + g_i, g_i a vector of the vocabulary's width fixed by (the request's seed, i) alone.  The
draft knows g_i as well: its guess argmax log q + g_i equals the target's token with probability
at least (1 - TV(p, q)) / (1 + TV(p, q)) (op. cit.), where a draft token drawn with noise of its
own matches a fresh draw of the target's only by chance.

So sampled SpecExec becomes greedy SpecExec over perturbed scores: the draft grows its tree by
log q + g (its favourite child: the guess), and the walk descends into the child holding
argmax log p + g.  Each index's noise is used once on the committed path (the next pass starts
after the last committed token), and the tokens are a function of the target and the noise
alone: the output is an exact sample of the target, the same for a given seed whatever the
draft, the budget or the method that uses this noise (plain autoregressive sampling draws the
same way).
"""

from __future__ import annotations

import threading

import torch

from specchat.speculation.sampling import SamplingParams, gumbel, probabilities, top_p_filter

CACHED = 256  # noise vectors kept (0.6 MB each for a 152k vocabulary); evicted ones are drawn again alike
_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant spreading consecutive indices over seed space


class GumbelNoise:
    """The noise g_i (vocab,) for each conversation index i of one request, from its seed."""

    def __init__(self, seed: int, vocab: int) -> None:
        self.seed, self.vocab = seed, vocab
        self._cache: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()  # the lookahead's thread draws beside the engine's

    @classmethod
    def drawn_from(cls, generator: torch.Generator, vocab: int) -> GumbelNoise:
        """Noise whose seed is the next draw of the request's ``generator``."""
        return cls(int(torch.randint(0, 2**62, (), generator=generator)), vocab)

    def at(self, index: int) -> torch.Tensor:
        """g_index, (vocab,) float64: the same every time it is asked for."""
        with self._lock:
            noise = self._cache.get(index)
            if noise is None:
                generator = torch.Generator().manual_seed((self.seed ^ (index * _MIX)) & (2**63 - 1))
                noise = gumbel((self.vocab,), generator)
                if len(self._cache) >= CACHED:
                    del self._cache[min(self._cache)]
                self._cache[index] = noise
            return noise

    def rows(self, indices: list[int], width: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """(N, width): g_i for each index, cut or padded (-inf: a token the target lacks) to ``width``."""
        out = torch.full((len(indices), width), -torch.inf, dtype=dtype)
        shared = min(width, self.vocab)
        for row, index in enumerate(indices):
            out[row, :shared] = self.at(index)[:shared]
        return out

    def choose(self, probs: torch.Tensor, index: int) -> int:
        """The target's token at ``index`` from its (V,) sampling distribution: argmax log p + g."""
        return int((probs.log() + self.rows([index], probs.shape[-1])[0]).argmax())

    def draft_logits(self, logits: torch.Tensor, indices: list[int], sampling: SamplingParams) -> torch.Tensor:
        """(N, V) draft logits -> (N, V) perturbed scores log q + g (-inf outside q's nucleus), to be
        ranked as greedy decoding ranks logits (:func:`~specchat.speculation.sampling.draft_top_log_scores`).

        q is the draft's distribution under the request's temperature and top-p, in float32 (the
        scores only shape the tree; the target's own choice is :meth:`choose`'s, in float64)."""
        probs = top_p_filter(torch.softmax(logits.float() / sampling.temperature, dim=-1), sampling.top_p)  # (N, V)
        return probs.log() + self.rows(indices, logits.shape[-1], torch.float32)


def sample_coupled(logits: torch.Tensor, sampling: SamplingParams, noise: GumbelNoise, index: int) -> int:
    """One sampled token at conversation ``index`` from (1, V) target logits, by the shared noise."""
    return noise.choose(probabilities(logits, sampling)[0], index)
