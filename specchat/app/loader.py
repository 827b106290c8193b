"""From a :class:`RunConfig` to a ready :class:`Engine`: resolve, pre-flight, load, pair, template."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

import torch

from specchat.app.config import RunConfig
from specchat.app.drafts import DraftChoice, choose_draft, int8_draft
from specchat.app.draftspeed import record_speed, speed_file, speed_key
from specchat.common.errors import SpecchatError
from specchat.common.paths import cache_dir
from specchat.engine.autobudget.costmodel import PRIOR_BETA, SELF_DRAFT_PRIOR_BETA
from specchat.engine.autobudget.costs import PassCosts
from specchat.engine.config import GenerationConfig
from specchat.engine.engine import Engine
from specchat.engine.events import DoneEvent, Event, GenerationStats
from specchat.model.loading import LoadedModel, load_int8, load_resident
from specchat.model.placement import Machine, OffloadPlan, check_tree, free_memory, largest_tree, place_target, resolve_device
from specchat.model.selfdraft import build_self_draft, self_draft_dir
from specchat.speculation.agreement import SELF_DRAFT_RATE
from specchat.speculation.lookahead import Lookahead
from specchat.weights.lowbit import LOWBIT_BITS
from specchat.model.target import load_target, target_ram_bytes
from specchat.sources.facts import read_facts
from specchat.sources.registry import load_registry
from specchat.sources.resolve import Progress, materialize, parse_model_spec
from specchat.weights.precision import resolve_compute_dtype


@dataclass
class Pipeline:
    engine: Engine
    target: LoadedModel
    draft: LoadedModel | None
    target_name: str
    draft_name: str | None
    draft_reason: str
    offload: OffloadPlan
    device: torch.device = torch.device("cpu")
    config: RunConfig | None = None  # what it was loaded with (the calibration's key)
    compute_dtype: torch.dtype = torch.float32  # the target's (and a 16-bit draft's)
    draft_bits: int | None = None  # bits per weight of the draft's decoder layers
    draft_bytes: int = 0  # RAM the draft takes beside the target (pre-flighted)

    @property
    def draft_summary(self) -> dict | None:
        """The draft as the stats name it: name, bits per weight, bytes; None without one."""
        if self.draft_name is None:
            return None
        return {"name": self.draft_name, "bits": self.draft_bits, "bytes": self.draft_bytes}

    @property
    def tokenizer(self):
        return self.target.tokenizer

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` through the model's chat template, ready for the reply."""
        return encode_chat(self.tokenizer, messages)

    def generate(self, prompt_ids: list[int], generation: GenerationConfig) -> Iterator[Event]:
        """The engine's events for ``prompt_ids``; a finished reply's decoding speed is recorded for
        ``--draft auto`` (:mod:`specchat.app.draftspeed`).  Closing it closes the engine's generator."""
        events = self.engine.generate(prompt_ids, generation)
        try:
            for event in events:
                if isinstance(event, DoneEvent):
                    self._record_speed(event.stats, generation)
                yield event
        finally:
            events.close()

    def _record_speed(self, stats: GenerationStats, generation: GenerationConfig) -> None:
        if self.draft_name is None or self.config is None:
            return
        key = speed_key(self.target_name, self.draft_name, self.offload, self.compute_dtype, self.device, self.config, generation)
        try:
            record_speed(speed_file(), key, stats)
        except (OSError, SpecchatError):  # a speed not kept costs only a later auto choice, never this reply
            pass


def encode_chat(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:  # a base model: plain concatenation
        text = "\n\n".join(m["content"] for m in messages)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def load_pipeline(config: RunConfig, progress: Progress = lambda message: None, calibrate: bool = True) -> Pipeline:
    """Resolve the models, decide once where everything goes, pre-flight, load, pair; with ``--budget auto``
    the pass costs are measured (or loaded) too, unless ``calibrate`` is False."""
    registry = load_registry()
    target_ref = parse_model_spec(config.model, registry)
    target_facts = read_facts(materialize(target_ref, progress))
    device = resolve_device(config.device)
    dtype, dtype_reason = resolve_compute_dtype(config.dtype, device)
    machine = Machine(device, dtype, free_memory(device))
    place = cache(partial(
        place_target, target_facts, config.offload, config.quant, config.ram_budget, dtype, device, machine.memory
    ))  # a draft's bytes -> the target's plan beside it; computed once per draft size
    choice = choose_draft(config, target_ref, target_facts, registry, machine, place, progress)  # before loading gigabytes
    plan = place(choice.load_bytes)
    ram_left = machine.memory.ram_available - target_ram_bytes(target_facts, plan, dtype) - choice.load_bytes
    if config.budget is not None and config.method != "ar" and not plan.on_gpu:
        check_tree(target_facts, config.budget, dtype, ram_left)
    progress(f"loading {target_ref.display}" + (f" for {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    progress(dtype_reason)
    store_root = config.store or cache_dir() / "stores"
    target = load_target(target_facts, plan, machine, choice.load_bytes, store_root, progress)
    progress(plan.reason)
    draft = _load_draft(choice, config, machine, target, plan, store_root, progress)
    costs = PassCosts(prior_beta=SELF_DRAFT_PRIOR_BETA if choice.self_kind else PRIOR_BETA)
    engine = Engine(
        target.lm, draft.lm if draft else None, target.tokenizer, target.eos_token_ids, costs=costs,
        lookahead=_lookahead(plan, target_facts, choice), agreement_prior=SELF_DRAFT_RATE if choice.self_kind else None,
    )
    if not plan.on_gpu:  # --budget auto never grows a tree the RAM cannot hold
        engine.costs.largest_budget = max(largest_tree(target_facts, dtype, ram_left), 1)
    pipeline = Pipeline(
        engine, target, draft, target_ref.display, choice.name, choice.reason, plan, device, config, dtype,
        _draft_bits(choice, config, machine), choice.load_bytes,
    )
    from specchat.app.calibration import prepare_costs  # (it needs this module's Pipeline)

    prepare_costs(pipeline, config, progress, calibrate)
    return pipeline


def _lookahead(plan: OffloadPlan, facts, choice: DraftChoice) -> Lookahead | None:
    """Grow the next tree during the target's pass where that pass waits for the disk and leaves
    the CPU idle (a target streamed from SSD on the CPU), with a draft made from the target,
    whose favourite chains the target mostly accepts; a sibling's bets lose more often than they
    win (docs/benchmarks.md, session 22)."""
    streams = plan.mode == "ssd" and not plan.on_gpu and plan.resident_layers < facts.num_layers
    return Lookahead() if streams and choice.self_kind else None


def _draft_bits(choice: DraftChoice, config: RunConfig, machine: Machine) -> int | None:
    if choice.facts is None:
        return None
    if choice.self_kind:
        return LOWBIT_BITS[choice.self_kind]
    return 8 if int8_draft(config, machine.device) else machine.dtype.itemsize * 8


def _load_draft(
    choice: DraftChoice, config: RunConfig, machine: Machine, target: LoadedModel, plan: OffloadPlan, store_root: Path,
    progress: Progress,
) -> LoadedModel | None:
    if choice.facts is None:
        return None
    if choice.self_kind:
        weights = plan.quant  # a 4-bit target's copy rounds its NF4 weights
        where = self_draft_dir(store_root, choice.facts, choice.self_kind, weights)
        lm = build_self_draft(target.lm, choice.facts, choice.self_kind, progress, cache_dir=where, weights=weights)
        return LoadedModel(lm, target.tokenizer, target.path)
    progress(f"loading {choice.ref.display}")
    if int8_draft(config, machine.device):
        return load_int8(choice.path, facts=choice.facts)
    return load_resident(choice.path, machine.dtype, str(machine.device), facts=choice.facts)
