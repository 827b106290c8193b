"""The decoding engine: SpecExec, SpecInfer and plain autoregressive decoding.

One :class:`Engine` holds a target, an optional draft, and the conversation
both have consumed so far (``tokens`` plus two KV caches).  Each call to
:meth:`Engine.generate` reuses the longest common prefix of the cached
conversation, prefills only what is new, then loops:

    grow a tree with the draft  ->  one target pass over the tree
    ->  walk it (accepted path + 1 drawn token)  ->  prune both caches

(with a :class:`~specchat.speculation.lookahead.Lookahead`, SpecExec's next tree starts growing
during the target pass; the next pass goes on from it when its bet was right)

and yields a :class:`TextEvent` per pass and a :class:`DoneEvent` at the end.

Cache invariant between passes: ``len(tokens) = L``; the target cache holds
positions [0, L-1) -- everything but the root, the last committed token; the
draft cache holds some prefix of that (its pending tokens are fed on the next
draft step).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import NamedTuple

import torch

from specchat.common.iostats import disk_read_bytes
from specchat.engine.autobudget.costmodel import CostModelTuner
from specchat.engine.autobudget.costs import PassCosts
from specchat.engine.config import EngineError, GenerationConfig
from specchat.engine.events import DoneEvent, Event, PrefillEvent, TextEvent
from specchat.engine.tally import Tally
from specchat.engine.textstream import TextStream
from specchat.model.lm import LanguageModel, causal_visibility
from specchat.model.kvcache import SharedPrefixCache
from specchat.speculation.agreement import GreedyAgreement
from specchat.speculation.growth import Growth, GrowthParams
from specchat.speculation.lookahead import Ahead, Lookahead
from specchat.speculation.coupling import GumbelNoise, sample_coupled
from specchat.speculation.sampling import SamplingParams
from specchat.speculation.speculator import SPECULATORS, Speculator, speculator_for
from specchat.speculation.tree import Tree
from specchat.speculation.verify import target_tree_logits

class PassResult(NamedTuple):
    """One target pass: the tokens it committed and what it cost."""

    drawn: list[int]  # accepted tree tokens, then the one the target drew
    tree_size: int  # nodes verified, the root excluded (0 for AR)
    draft_s: float
    target_s: float
    ran_out: bool  # the accepted path ended at a leaf: a bigger tree could have given more
    within: dict[int, int]  # smaller budget -> tokens had the tree been its best that many nodes


PREFILL_CHUNK = 512  # prompt tokens per layer call in a prefill, to bound activation memory


class Engine:
    def __init__(
        self,
        target: LanguageModel,
        draft: LanguageModel | None,
        tokenizer,
        eos_token_ids: Sequence[int],
        costs: PassCosts | None = None,
        clock: Callable[[], float] = time.perf_counter,
        speculators: Mapping[str, Speculator] = SPECULATORS,
        greedy_agreement: bool = True,
        agreement_prior: float | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        lookahead: Lookahead | None = None,
    ) -> None:
        self.target = target
        self.draft = draft
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk  # prompt tokens per layer call in a prefill
        self.eos_token_ids = frozenset(eos_token_ids)
        self.costs = costs if costs is not None else PassCosts()
        self.clock = clock  # seconds; every duration the engine reports or weighs is read from it
        self.speculators = speculators  # method name -> how it grows and walks a tree
        # greedy SpecExec trees are scored by how often the target took the draft's favourite
        # (agreement_prior: the rate assumed before any pass is measured; None: the draft's q1)
        self.agreement = GreedyAgreement(agreement_prior) if greedy_agreement else None
        # the same for sampled SpecExec's favourites, the draft's guesses by the shared noise
        self.coupled_agreement = GreedyAgreement(agreement_prior) if greedy_agreement else None
        # SpecExec's next tree grown during the target's pass (lookahead.py); the one it began, while valid
        self.lookahead = lookahead if draft is not None else None
        self._ahead: Ahead | None = None
        self.target_cache = target.new_cache()
        self.draft_cache = self._new_draft_cache(draft)
        self.tokens: list[int] = []  # the conversation both caches describe
        self.last_draft_forwards = 0  # draft forwards spent growing the last tree

    # -- public ------------------------------------------------------------------
    def generate(self, prompt_ids: Sequence[int], config: GenerationConfig) -> Iterator[Event]:
        """Continue ``prompt_ids`` (the whole conversation so far); yield events."""
        self.check_request(prompt_ids, config)
        # Before the clock starts: a first --budget auto request may have to calibrate.
        tuner = self.tuner_for(config) if config.auto_budget and config.method != "ar" else None
        start_time, start_bytes = self.clock(), disk_read_bytes()
        generator = torch.Generator().manual_seed(config.seed if config.seed is not None else random.getrandbits(63))
        tally = Tally(speculator_for(config.method, self.speculators) if config.method != "ar" else None)
        noise = self._noise(config, tally.speculator, generator)
        try:
            prefill_tokens = yield from self._sync(list(prompt_ids))
            prefill_s = self.clock() - start_time
            decode_start_bytes = disk_read_bytes()
            max_new = min(config.max_new_tokens, self.target.max_context - len(self.tokens) - config.max_depth - 1)
            stream = TextStream(self.tokenizer, config.stop)
            pass_config = config  # with --budget auto, each pass's own budget
            while len(tally.new_ids) < max_new:
                pass_config = replace(config, budget=tuner.current) if tuner else config
                event, done = self._decode_step(pass_config, generator, noise, tuner, stream, tally, max_new)
                yield event
                if done:
                    break
            budget = (pass_config.budget or (tuner.current if tuner else 0)) if config.method != "ar" else 0
            stats = tally.stats(
                method=config.method, budget=budget, prompt_tokens=len(prompt_ids), prefill_tokens=prefill_tokens,
                wall_s=self.clock() - start_time, prefill_s=prefill_s,
                disk_read_bytes=disk_read_bytes() - start_bytes, decode_read_bytes=disk_read_bytes() - decode_start_bytes,
            )
            yield DoneEvent(stream.text, tuple(tally.new_ids), stats)
        finally:
            self._ahead = None  # the next request continues another conversation
            self._repair()

    def _noise(self, config: GenerationConfig, speculator: Speculator | None, generator: torch.Generator) -> GumbelNoise | None:
        """A sampled request's shared noise (speculation/coupling.py), where plain decoding or a coupled
        method draws by it; its seed is the generator's first draw."""
        if config.sampling.greedy or (speculator is not None and not speculator.coupled):
            return None
        return GumbelNoise.drawn_from(generator, self.target.vocab_size)

    def tuner_for(self, config: GenerationConfig) -> CostModelTuner:
        """The ``--budget auto`` tuner of this method and sampling mode (calibrating first if nobody has)."""
        self.costs.ensure(self.target, self.draft, config.max_depth, config.width)
        return self.costs.tuner(config.method, config.temperature, config.top_p, config.max_depth)

    def reset(self) -> None:
        """Forget the conversation and free the caches' buffers."""
        self.tokens = []
        self._ahead = None
        for cache in (self.target_cache, self.draft_cache):
            if cache is not None:
                cache.reset()

    def _new_draft_cache(self, draft: LanguageModel | None):
        """The draft's own cache; for a draft that can attend to the target's keys and values (one
        made from the target), a view whose committed prefix is the target's cache."""
        if draft is None:
            return None
        if getattr(draft, "kv_source", None) is self.target:
            return SharedPrefixCache(self.target_cache)
        return draft.new_cache()

    # -- one target pass -------------------------------------------------------------
    def _decode_step(
        self, config: GenerationConfig, generator: torch.Generator, noise: GumbelNoise | None,
        tuner: CostModelTuner | None, stream: TextStream, tally: Tally, max_new: int,
    ) -> tuple[TextEvent, bool]:
        """One pass, committed: (its event, whether the reply is complete); a sampled request draws
        by ``noise`` (speculation/coupling.py) where its method is coupled, and plain decoding always does."""
        if tally.speculator is None:
            drawn, tree_size, draft_s, target_s, ran_out, within = self._plain_pass(config.sampling, noise)
        else:
            drawn, tree_size, draft_s, target_s, ran_out, within = self._tree_pass(
                tally.speculator, config, generator, noise, tally, smaller=tuner.candidates_below(config.budget) if tuner else ())
        if tuner:
            tuner.observe(config.budget, len(drawn), draft_s, target_s, ran_out, within)
        tally.add_pass(tree_size, draft_s, target_s)
        drawn, tally.finish = self._trim(drawn, max_new - len(tally.new_ids))
        self._commit(drawn)
        tally.new_ids.extend(drawn)
        text, stopped_at = stream.push([t for t in drawn if t not in self.eos_token_ids])
        if stopped_at is not None:
            tally.finish = "stop"
            self._truncate_to(len(self.tokens) - len(tally.new_ids) + stopped_at)
            del tally.new_ids[stopped_at:]
        done = tally.finish != "length" or len(tally.new_ids) >= max_new
        if done and tally.finish != "stop":
            text += stream.flush()
        return TextEvent(text, tuple(drawn), len(drawn) - 1, tree_size, draft_s, target_s), done

    def _tree_pass(
        self, speculator: Speculator, config: GenerationConfig, generator: torch.Generator, noise: GumbelNoise | None,
        tally: Tally, smaller: tuple[int, ...] = (),
    ) -> PassResult:
        """Grow, verify, walk; prunes both caches.  ``smaller``: the budgets below this one whose
        tokens the pass reports (for ``--budget auto``, :meth:`Tree.tokens_within`)."""
        sampling = config.sampling
        started = self.clock()
        self.target.prefetch()  # a streamed target reads its first layers while the draft works
        growth = self.costs.growth(config.growth, config.auto_width) if config.adaptive else config.growth
        agreement = self.agreement if sampling.greedy else self.coupled_agreement if noise is not None else None
        growth = replace(growth, agreement=agreement, noise=noise)
        grown = self._grow(speculator, growth, sampling, generator, tally)
        tree, self.last_draft_forwards = grown.tree, grown.draft_forwards
        draft_s = self.clock() - started
        if grown.draft_forwards:
            self.costs.observe_draft(config.width, draft_s, grown.draft_forwards, grown.predicted_s, speculator.times_draft_steps)

        started = self.clock()
        prefix = self.target_cache.length  # = len(tokens) - 1
        bet = self._bet(speculator, tree, growth, sampling)  # the next tree grows while the target verifies
        try:
            logits = target_tree_logits(self.target, self.target_cache, tree)  # (N, V)
        finally:
            ahead = self.lookahead.finish(bet) if bet is not None else None  # stopped at its next draft layer
        accepted, drawn = speculator.walk(tree, logits, sampling, generator, noise, len(self.tokens))
        path = [0] + accepted
        # Keep the root and accepted nodes: slots prefix + node index.
        self.target_cache.keep(prefix, prefix + torch.tensor(path))
        new = tree.tokens[torch.tensor(accepted, dtype=torch.long)].tolist() + [drawn]
        if bet is not None:
            self._ahead = self.lookahead.settle(bet, ahead, self.draft, self.draft_cache, accepted, drawn, self.tokens + new)
        else:
            draft_slots = tree.draft_slots[torch.tensor(path)]
            self.draft_cache.keep(prefix, draft_slots[draft_slots >= 0])
        target_s = self.clock() - started
        self.costs.observe_target(config.budget, target_s)
        if growth.agreement is not None:
            self._observe_agreement(growth.agreement, tree, path, new)
        ran_out = not bool((tree.parents == path[-1]).any())  # the accepted path ended at a leaf
        return PassResult(new, tree.size - 1, draft_s, target_s, ran_out, tree.tokens_within(accepted, smaller))

    def _bet(self, speculator: Speculator, tree: Tree, growth: GrowthParams, sampling: SamplingParams):
        """Start the lookahead on ``tree`` (speculation/lookahead.py), where this engine and method have one."""
        if self.lookahead is None or not speculator.looks_ahead:
            return None
        gate = getattr(self.target, "waiting_for_layers", None)  # it drafts only while the target waits for the disk
        return self.lookahead.start(self.draft, self.draft_cache, self.tokens, tree, growth, sampling, speculator.choose_width, gate)

    def _grow(
        self, speculator: Speculator, growth: GrowthParams, sampling: SamplingParams, generator: torch.Generator, tally: Tally
    ) -> Growth:
        """This pass's tree: the one the lookahead began, where it bet right, else a new one."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.tokens == tuple(self.tokens):
            tally.lookahead_hits += 1
            return speculator.resume(self.draft, self.draft_cache, ahead.builder, growth, sampling, ahead.spent_s)
        return speculator.grow(self.draft, self.draft_cache, self.tokens, growth, sampling, generator)

    @staticmethod
    def _observe_agreement(agreement: GreedyAgreement, tree: Tree, path: list[int], chosen: list[int]) -> None:
        """After each node of the accepted path the target chose ``chosen[i]``: was it the draft's favourite?"""
        for node, token in zip(path, chosen):
            favourite = int(tree.favourites[node])
            if favourite >= 0:
                agreement.observe(float(tree.favourite_probs[node]), favourite == token)

    def _plain_pass(self, sampling: SamplingParams, noise: GumbelNoise | None) -> PassResult:
        """Autoregressive decoding: one target forward over the root, one token."""
        started = self.clock()
        root = torch.tensor(self.tokens[-1:])
        position = torch.tensor([len(self.tokens) - 1])
        visible = causal_visibility(self.target_cache.length, 1)
        logits = self.target.forward(root, position, visible, self.target_cache)  # (1, V)
        token = int(logits[0].argmax()) if noise is None else sample_coupled(logits, sampling, noise, len(self.tokens))
        return PassResult([token], 0, 0.0, self.clock() - started, False, {})

    # -- bookkeeping --------------------------------------------------------------------
    def _trim(self, drawn: list[int], room: int) -> tuple[list[int], str]:
        for i, token in enumerate(drawn[:room]):
            if token in self.eos_token_ids:
                return drawn[: i + 1], "eos"
        return drawn[:room], "length"

    def _commit(self, drawn: list[int]) -> None:
        self.tokens.extend(drawn)
        self._repair()  # a trimmed pass may have cached more than was committed

    def _truncate_to(self, length: int) -> None:
        del self.tokens[length:]
        self._repair()

    def _repair(self) -> None:
        """Restore the invariant: each cache holds at most the first len(tokens) - 1 positions --
        save the draft's, while a tree the lookahead began for this very conversation follows them."""
        if self._ahead is not None and self._ahead.tokens != tuple(self.tokens):
            self._ahead = None  # a trimmed or stopped pass: the bet was on other tokens
        limit = max(len(self.tokens) - 1, 0)
        for cache in (self.target_cache, self.draft_cache if self._ahead is None else None):
            if cache is not None:
                cache.crop(min(cache.length, limit))

    def _sync(self, prompt: list[int]) -> Iterator[PrefillEvent]:
        """Make ``prompt`` the conversation, reusing the common cached prefix; yields the target's
        prefill progress for a long prompt and returns the tokens prefilled."""
        common = 0
        for old, new in zip(self.tokens, prompt):
            if old != new:
                break
            common += 1
        limit = min(common, len(prompt) - 1)
        if limit == 0:
            self.reset()  # nothing to reuse: free buffers sized for the last conversation
        self.tokens = prompt
        for cache in (self.target_cache, self.draft_cache):
            if cache is not None:
                cache.crop(min(cache.length, limit))
        prefilled = yield from self._prefill(self.target, self.target_cache)
        if self.draft is not None:
            for _ in self._prefill(self.draft, self.draft_cache):
                pass
        return prefilled

    def _prefill(self, model: LanguageModel, cache) -> Iterator[PrefillEvent]:
        """Feed ``tokens[cache.length : -1]`` (the root stays pending); returns the tokens fed.

        A prompt of one chunk is one forward.  A longer one goes layer by layer, each layer
        over every chunk (:meth:`LayeredLM.prefill`: a streamed model reads each layer once, not
        once per chunk), with progress after each tenth of the work."""
        first, todo = cache.length, len(self.tokens) - 1 - cache.length
        if todo <= 0:
            return 0
        ids = torch.tensor(self.tokens[first:-1])
        if todo <= self.prefill_chunk:
            visible = causal_visibility(first, todo)
            model.forward(ids, torch.arange(first, first + todo), visible, cache, logit_rows=torch.tensor([todo - 1]))
            return todo
        tenth = 0
        for share in model.prefill(ids, first, cache, self.prefill_chunk):
            if int(10 * share) > tenth:
                tenth = int(10 * share)
                yield PrefillEvent(round(todo * share), todo)
        return todo

    def check_request(self, prompt_ids: Sequence[int], config: GenerationConfig) -> None:
        """Raise :class:`EngineError` for a request :meth:`generate` cannot serve (it checks, too)."""
        if len(prompt_ids) == 0:
            raise EngineError("the prompt is empty")
        if config.method != "ar" and self.draft is None:
            raise EngineError(f"method {config.method} needs a draft model")
        room = self.target.max_context - config.max_depth - 1
        if len(prompt_ids) >= room:
            raise EngineError(
                f"the prompt has {len(prompt_ids)} tokens but the model's context holds {self.target.max_context}"
            )
