"""One object per tree method: how it grows a tree with the draft and how it walks the verified
tree.  The engine picks one by name once per request (:func:`speculator_for`); a new method or a
new kind of draft plugs in here, not as another branch in the engine."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from specchat.model.kvcache import KVCache
from specchat.model.lm import LanguageModel
from specchat.speculation.coupling import GumbelNoise
from specchat.speculation.growth import Growth, GrowthParams, choose_width, grow_specexec, grow_specinfer
from specchat.speculation.sampling import SamplingParams
from specchat.speculation.tree import Tree, TreeBuilder
from specchat.speculation.verify import walk_specexec, walk_specinfer


class Speculator(Protocol):
    name: str
    # Whether its draft steps are all of one width, so that their measured seconds may steer
    # SpecExec's adaptive stop (SpecInfer's levels have other widths and would mislead it).
    times_draft_steps: bool
    # Whether the engine may grow its next tree while the target verifies this one
    # (speculation/lookahead.py; its growth must not draw random numbers, as SpecExec's does not).
    looks_ahead: bool
    # Whether a sampled request grows and walks its trees by the request's shared noise
    # (speculation/coupling.py) rather than drawing from the generator.
    coupled: bool

    def grow(
        self, draft: LanguageModel, cache: KVCache, committed: list[int], growth: GrowthParams,
        sampling: SamplingParams, generator: torch.Generator | None,
    ) -> Growth:
        """A tree of ``growth.budget`` nodes after the committed tokens (draft-side KV reused)."""
        ...

    def walk(
        self, tree: Tree, logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator,
        noise: GumbelNoise | None = None, first_index: int = 0,
    ) -> tuple[list[int], int]:
        """(accepted node indices, root excluded; the token drawn after them) from the target's
        (N, V) tree logits; with ``noise`` (a coupled method's), the root's child is token
        ``first_index`` of the conversation."""
        ...


@dataclass(frozen=True)
class SpecExec:
    """Best-first growth of the draft's most probable paths; the walk samples the target at each
    visited node (SpecExec, arXiv 2406.02532, Sec. 3).  Sampled, both go by the request's shared
    noise (``coupled``, speculation/coupling.py): the draft's favourite child is then its guess of
    the very token the target will draw, and its trees are grown and scored as greedy ones are."""

    name: str = "specexec"
    times_draft_steps: bool = True
    looks_ahead: bool = True
    coupled: bool = True
    choose_width: Callable = choose_width  # each step's width, from the calibrated step costs

    def grow(self, draft, cache, committed, growth, sampling, generator) -> Growth:
        return grow_specexec(draft, cache, committed, growth, sampling, self.choose_width)

    def resume(self, draft, cache, start: TreeBuilder, growth, sampling, spent_s: float) -> Growth:
        """Go on growing a tree begun by the lookahead (its root expanded; ``spent_s`` its cost so far)."""
        return grow_specexec(draft, cache, [], growth, sampling, self.choose_width, start=start, spent_s=spent_s)

    def walk(self, tree, logits, sampling, generator, noise=None, first_index=0) -> tuple[list[int], int]:
        return walk_specexec(tree, logits, sampling, generator, noise, first_index)


@dataclass(frozen=True)
class SpecInfer:
    """A tree sampled from the draft; multi-step speculative sampling verifies it (SpecInfer,
    arXiv 2305.09781, Sec. 4)."""

    name: str = "specinfer"
    times_draft_steps: bool = False
    looks_ahead: bool = False  # its growth samples: a tree grown ahead would draw out of turn
    coupled: bool = False  # its acceptance rule needs a tree drawn from q (Sec. 4.2)

    def grow(self, draft, cache, committed, growth, sampling, generator) -> Growth:
        return grow_specinfer(draft, cache, committed, growth, sampling, generator)

    def walk(self, tree, logits, sampling, generator, noise=None, first_index=0) -> tuple[list[int], int]:
        return walk_specinfer(tree, logits, sampling, generator)


SPECULATORS: dict[str, Speculator] = {"specexec": SpecExec(), "specinfer": SpecInfer()}


def speculator_for(method: str, speculators: Mapping[str, Speculator] = SPECULATORS) -> Speculator:
    try:
        return speculators[method]
    except KeyError:
        raise ValueError(f"no tree method {method!r}; one of {', '.join(SPECULATORS)}") from None
