"""The decoding engine: SpecExec, SpecInfer and plain autoregressive decoding.

One :class:`Engine` holds a target, an optional draft, and the conversation
both have consumed so far (``tokens`` plus two KV caches).  Each call to
:meth:`Engine.generate` reuses the longest common prefix of the cached
conversation, prefills only what is new, then loops:

    grow a tree with the draft  ->  one target pass over the tree
    ->  walk it (accepted path + 1 drawn token)  ->  prune both caches

and yields a :class:`TextEvent` per pass and a :class:`DoneEvent` at the end.

Cache invariant between passes: ``len(tokens) = L``; the target cache holds
positions [0, L-1) -- everything but the root, the last committed token; the
draft cache holds some prefix of that (its pending tokens are fed on the next
draft step).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from specchat.engine.events import DoneEvent, Event, GenerationStats, TextEvent
from specchat.engine.autobudget.measure import measure_calibration
from specchat.engine.autobudget.costmodel import Calibration, CostModelTuner, interpolate
from specchat.speculation.growth import GrowthParams, grow_specexec, grow_specinfer
from specchat.common.iostats import disk_read_bytes
from specchat.model.lm import LanguageModel, causal_visibility
from specchat.speculation.sampling import SamplingParams, probabilities, sample
from specchat.engine.textstream import TextStream
from specchat.speculation.verify import target_tree_logits, walk_specexec, walk_specinfer

METHODS = ("specexec", "specinfer", "ar")
WIDTHS = (1, 2, 4, 8, 16, 32, 64)  # draft step widths auto width chooses from
PREFILL_CHUNK = 512  # prompt tokens per prefill forward, to bound activation memory


class EngineError(ValueError):
    """A request the engine cannot serve (empty prompt, context overflow, ...)."""


@dataclass(frozen=True)
class GenerationConfig:
    method: str = "specexec"
    budget: int = 64  # tree nodes per target pass (SpecExec K), root excluded
    max_depth: int = 32
    draft_batch: int = 16  # nodes expanded per draft forward
    auto_width: bool = False  # SpecExec: each draft step picks its width from the calibrated step costs
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    adaptive: bool = True  # SpecExec: stop growing when a draft step costs more than it adds
    auto_budget: bool = False  # choose the budget per pass from the cost model (``budget`` is then ignored)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("budget", "max_depth", "draft_batch", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        SamplingParams(self.temperature, self.top_p)  # validates both

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p)

    @property
    def growth(self) -> GrowthParams:
        return GrowthParams(self.budget, self.max_depth, self.draft_batch)


def _running_mean(previous: float | None, sample: float, weight: float = 0.3) -> float:
    return sample if previous is None else (1 - weight) * previous + weight * sample


class Engine:
    def __init__(
        self,
        target: LanguageModel,
        draft: LanguageModel | None,
        tokenizer,
        eos_token_ids: Sequence[int],
    ) -> None:
        self.target = target
        self.draft = draft
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.target_cache = target.new_cache()
        self.draft_cache = draft.new_cache() if draft is not None else None
        self.tokens: list[int] = []  # the conversation both caches describe
        self.last_draft_forwards = 0  # draft forwards spent growing the last tree
        # Running costs (seconds) that SpecExec's adaptive stop weighs, measured on SpecExec's own
        # passes only; absent until measured.
        self._draft_step_s: dict[int, float] = {}  # by draft width (draft_batch)
        self._target_pass_s: dict[int, float] = {}  # by budget
        self._draft_scale = 1.0  # measured / calibrated draft seconds (auto width)
        # --budget auto: measured costs (set by the pipeline, or measured on first use) and a
        # tuner per (method, temperature, top_p): acceptance differs with each
        self.calibration: Calibration | None = None
        self.tuners: dict[tuple[str, float, float], CostModelTuner] = {}

    # -- public ------------------------------------------------------------------
    def generate(self, prompt_ids: Sequence[int], config: GenerationConfig) -> Iterator[Event]:
        """Continue ``prompt_ids`` (the whole conversation so far); yield events."""
        self._check_request(prompt_ids, config)
        # Before the clock starts: a first --budget auto request may have to calibrate.
        tuner = self.tuner_for(config) if config.auto_budget and config.method != "ar" else None
        start_time, start_bytes = time.perf_counter(), disk_read_bytes()
        generator = torch.Generator().manual_seed(
            config.seed if config.seed is not None else random.getrandbits(63)
        )
        try:
            prefill_tokens = self._sync(list(prompt_ids))
            prefill_s = time.perf_counter() - start_time
            decode_start_bytes = disk_read_bytes()
            budget = config.max_new_tokens
            budget = min(budget, self.target.max_context - len(self.tokens) - config.max_depth - 1)
            stream = TextStream(self.tokenizer, config.stop)
            new_ids: list[int] = []
            passes, draft_total, target_total, finish = 0, 0.0, 0.0, "length"
            tree_nodes = 0
            while len(new_ids) < budget:
                pass_config = replace(config, budget=tuner.current) if tuner else config
                drawn, tree_size, draft_s, target_s = self._one_pass(pass_config, generator)
                if tuner:
                    tuner.observe(pass_config.budget, len(drawn), draft_s, target_s)
                passes += 1
                tree_nodes += tree_size
                draft_total += draft_s
                target_total += target_s
                drawn, finish = self._trim(drawn, budget - len(new_ids))
                self._commit(drawn)
                new_ids.extend(drawn)
                text_ids = [t for t in drawn if t not in self.eos_token_ids]
                text, stopped_at = stream.push(text_ids)
                if stopped_at is not None:
                    finish = "stop"
                    self._truncate_to(len(self.tokens) - len(new_ids) + stopped_at)
                    new_ids = new_ids[:stopped_at]
                done = finish != "length" or len(new_ids) >= budget
                if done and finish != "stop":
                    text += stream.flush()
                yield TextEvent(text, tuple(drawn), len(drawn) - 1, tree_size, draft_s, target_s)
                if done:
                    break
            wall = time.perf_counter() - start_time
            stats = GenerationStats(
                method=config.method,
                budget=(pass_config.budget if passes else config.budget) if config.method != "ar" else 0,
                prefill_tokens=prefill_tokens,
                new_tokens=len(new_ids),
                target_passes=passes,
                tokens_per_pass=len(new_ids) / passes if passes else 0.0,
                tokens_per_s=len(new_ids) / max(wall - prefill_s, 1e-9),
                wall_s=wall,
                prefill_s=prefill_s,
                draft_s=draft_total,
                target_s=target_total,
                disk_read_bytes=disk_read_bytes() - start_bytes,
                decode_read_bytes=disk_read_bytes() - decode_start_bytes,
                finish_reason=finish,
                tree_nodes=tree_nodes,
            )
            yield DoneEvent(stream.text, tuple(new_ids), stats)
        finally:
            self._repair()

    def tuner_for(self, config: GenerationConfig) -> CostModelTuner:
        """The ``--budget auto`` tuner of this method and sampling mode (calibrating first if nobody has)."""
        key = (config.method, config.temperature, config.top_p if config.temperature > 0 else 1.0)
        if key not in self.tuners:
            if self.calibration is None:
                self.calibration = measure_calibration(self.target, self.draft, config.max_depth, config.draft_batch)
            self.tuners[key] = CostModelTuner(self.calibration, config.method, config.max_depth)
        return self.tuners[key]

    def reset(self) -> None:
        self.tokens = []
        self._repair()

    # -- one target pass -------------------------------------------------------------
    def _one_pass(
        self, config: GenerationConfig, generator: torch.Generator
    ) -> tuple[list[int], int, float, float]:
        """Returns (new tokens, tree size, draft seconds, target seconds); prunes caches."""
        sampling = config.sampling
        if config.method == "ar":
            started = time.perf_counter()
            root = torch.tensor(self.tokens[-1:])
            position = torch.tensor([len(self.tokens) - 1])
            visible = causal_visibility(self.target_cache.length, 1)
            logits = self.target.forward(root, position, visible, self.target_cache)  # (1, V)
            if sampling.greedy:
                token = int(logits[0].argmax())
            else:
                token = sample(probabilities(logits, sampling)[0], generator)
            return [token], 0, 0.0, time.perf_counter() - started

        started = time.perf_counter()
        self.target.prefetch()  # a streamed target reads its first layers while the draft works
        predicted_s = 0.0
        if config.method == "specexec":
            growth = replace(
                config.growth,
                draft_step_s=self._draft_step_s.get(config.draft_batch),
                target_pass_s=self._target_pass_s.get(config.budget),
                width_costs=self._width_costs(config),
            ) if config.adaptive else config.growth
            tree, self.last_draft_forwards, predicted_s = grow_specexec(self.draft, self.draft_cache, self.tokens, growth, sampling)
            walk = walk_specexec
        else:
            tree, self.last_draft_forwards = grow_specinfer(
                self.draft, self.draft_cache, self.tokens, config.growth, sampling, generator
            )
            walk = walk_specinfer
        draft_s = time.perf_counter() - started
        if config.method == "specexec":  # SpecInfer's steps have other widths: they would mislead the stop
            step_s = draft_s / max(self.last_draft_forwards, 1)
            self._draft_step_s[config.draft_batch] = _running_mean(self._draft_step_s.get(config.draft_batch), step_s)
        if predicted_s > 0:  # predicted_s used the old scale: measured / calibrated = scale * measured / predicted
            self._draft_scale = _running_mean(self._draft_scale, self._draft_scale * draft_s / predicted_s)

        started = time.perf_counter()
        prefix = self.target_cache.length  # = len(tokens) - 1
        logits = target_tree_logits(self.target, self.target_cache, tree)  # (N, V)
        accepted, drawn = walk(tree, logits, sampling, generator)
        path = [0] + accepted
        # Keep the root and accepted nodes: slots prefix + node index.
        self.target_cache.keep(prefix, prefix + torch.tensor(path))
        draft_slots = tree.draft_slots[torch.tensor(path)]
        self.draft_cache.keep(prefix, draft_slots[draft_slots >= 0])
        target_s = time.perf_counter() - started
        self._target_pass_s[config.budget] = _running_mean(self._target_pass_s.get(config.budget), target_s)
        new = tree.tokens[torch.tensor(accepted, dtype=torch.long)].tolist() + [drawn]
        return new, tree.size - 1, draft_s, target_s

    def _width_costs(self, config: GenerationConfig) -> tuple[tuple[int, float], ...]:
        """(width, predicted seconds of a draft forward over that many nodes) for auto width: the
        calibrated step times, interpolated and rescaled by what this session's passes measured."""
        table = self.calibration.draft_step_s if self.calibration is not None else {}
        if not (config.auto_width and table):
            return ()
        widths = [w for w in WIDTHS if w <= max(config.budget, 1)]
        return tuple((w, self._draft_scale * interpolate(table, w)) for w in widths)

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
        """Restore the invariant: each cache holds at most the first len(tokens) - 1 positions."""
        limit = max(len(self.tokens) - 1, 0)
        for cache in (self.target_cache, self.draft_cache):
            if cache is not None:
                cache.crop(min(cache.length, limit))

    def _sync(self, prompt: list[int]) -> int:
        """Make ``prompt`` the conversation, reusing the common cached prefix; returns tokens prefilled."""
        common = 0
        for old, new in zip(self.tokens, prompt):
            if old != new:
                break
            common += 1
        self.tokens = prompt
        limit = min(common, len(prompt) - 1)
        for cache in (self.target_cache, self.draft_cache):
            if cache is not None:
                cache.crop(min(cache.length, limit))
        prefilled = self._prefill(self.target, self.target_cache)
        if self.draft is not None:
            self._prefill(self.draft, self.draft_cache)
        return prefilled

    def _prefill(self, model: LanguageModel, cache) -> int:
        """Feed ``tokens[cache.length : -1]`` in chunks; the root stays pending."""
        todo = len(self.tokens) - 1 - cache.length
        while cache.length < len(self.tokens) - 1:
            start = cache.length
            end = min(start + PREFILL_CHUNK, len(self.tokens) - 1)
            ids = torch.tensor(self.tokens[start:end])
            visible = causal_visibility(start, end - start)
            model.forward(ids, torch.arange(start, end), visible, cache, logit_rows=torch.tensor([end - start - 1]))
        return todo

    def _check_request(self, prompt_ids: Sequence[int], config: GenerationConfig) -> None:
        if len(prompt_ids) == 0:
            raise EngineError("the prompt is empty")
        if config.method != "ar" and self.draft is None:
            raise EngineError(f"method {config.method} needs a draft model")
        room = self.target.max_context - config.max_depth - 1
        if len(prompt_ids) >= room:
            raise EngineError(
                f"the prompt has {len(prompt_ids)} tokens but the model's context holds {self.target.max_context}"
            )
