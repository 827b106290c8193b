"""Which draft grows the trees: the one configured, a low-bit copy of the target itself
(``--draft self``), or (``--draft auto``) the first registered draft of the target that is here,
shares its tokenizer and fits beside it -- or the target's own low-bit copy, where it measured
faster here, or before both were measured, where the target streams or computes in float32
(:func:`_self_or_sibling`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from specchat.app.config import RunConfig
from specchat.app.draftspeed import measured_speed, speed_file, speed_key
from specchat.common.errors import InputError, ModelNotFound, SpecchatError
from specchat.model.loading import check_same_tokenizer, load_tokenizer
from specchat.model.placement import RAM_HEADROOM, Machine, OffloadPlan, draft_bytes, resolve_quant, room_beside_target
from specchat.model.selfdraft import DEFAULT_SELF_KIND, self_draft_bytes, self_draft_kind
from specchat.sources.facts import ModelFacts, read_facts
from specchat.sources.registry import ModelEntry
from specchat.sources.resolve import ModelRef, Progress, materialize, parse_model_spec


Placer = Callable[[int], OffloadPlan]  # a draft's bytes -> where the target's layers go beside it


@dataclass(frozen=True)
class DraftChoice:
    ref: ModelRef | None  # the draft model; None: no draft, or the target itself
    facts: ModelFacts | None  # the draft's (for a self draft: the target's)
    reason: str  # one line: what was chosen and why
    load_bytes: int = 0  # the draft's loading peak (:func:`draft_bytes`, :func:`self_draft_bytes`)
    self_kind: str | None = None  # a self draft's low-bit kind ("int8", "int4")

    @property
    def path(self) -> Path | None:
        return self.facts.path if self.facts else None

    @property
    def name(self) -> str | None:
        """How the user names this draft: ``self:int8``, a registry name or a path; None without one."""
        if self.self_kind:
            return f"self:{self.self_kind}"
        return self.ref.display if self.ref else None


def int8_draft(config: RunConfig, device: torch.device) -> bool:
    """Dynamic int8 is a CPU speed-up; a GPU runs the draft in 16-bit."""
    return config.draft_quant == "int8" and device.type == "cpu"


def choose_draft(
    config: RunConfig, target_ref: ModelRef, target: ModelFacts, registry: dict[str, ModelEntry], machine: Machine,
    place: Placer, progress: Progress,
) -> DraftChoice:
    """The draft for ``config``; its tokenizer is checked against the target's before anything loads.
    ``place`` is the loader's own placement of the target (the one it will load by), asked here
    only where the choice depends on whether the target streams."""
    if config.method == "ar" or config.draft == "none":
        return DraftChoice(None, None, "no draft: plain autoregressive decoding")
    kind = self_draft_kind(config.draft)
    if kind is not None:
        return _self_draft(target, kind, machine)
    if config.draft != "auto":
        ref = parse_model_spec(config.draft, registry)
        facts = read_facts(materialize(ref, progress))
        check_same_tokenizer(load_tokenizer(target.path), load_tokenizer(facts.path), ref.display)
        reason = f"draft {ref.display}: as configured (--draft, SPECCHAT_DRAFT or the config file); same tokenizer as the target"
        return DraftChoice(ref, facts, reason, draft_bytes(facts, int8_draft(config, machine.device), machine.dtype))
    return _auto_draft(config, target_ref, target, registry, machine, place, progress)


def _self_draft_for_unpaired(
    config: RunConfig, target_ref: ModelRef, target: ModelFacts, machine: Machine, room: int
) -> DraftChoice:
    """``--draft auto`` for a target models.toml pairs with no draft: its own layers in low bits
    (:func:`self_kind_for`), where they fit."""
    kind = self_kind_for(config.quant)
    needed = int(self_draft_bytes(target, kind, machine.dtype) * RAM_HEADROOM)
    if machine.device.type != "cpu" or needed > room:
        why = "a self draft runs on the CPU only so far" if machine.device.type != "cpu" else (
            f"a self draft needs {needed / 1e9:.1f} GB, {max(room, 0) / 1e9:.1f} GB are left beside the target"
        )
        raise InputError(
            f"no registered draft pairs with {target_ref.display}, and {why}",
            "name one with --draft, or use --draft none for plain decoding",
        )
    choice = _self_draft(target, kind, machine)
    reason = (
        f"draft self:{kind}: no registered draft pairs with {target_ref.display}, so its own layers "
        f"in {kind} ({needed / 1e9:.2f} of {room / 1e9:.1f} GB), sharing its embeddings and head"
    )
    return replace(choice, reason=reason)


def _self_or_sibling(
    config: RunConfig, target_ref: ModelRef, target: ModelFacts, machine: Machine, place: Placer, room: int,
    sibling: DraftChoice,
) -> DraftChoice:
    """The self draft or ``sibling``: the faster by the decoding speeds measured here in these
    settings once both have run (:mod:`specchat.app.draftspeed`); before that, by where the target lives.

    A streamed pass costs the disk's time for its layers whatever the tree, so what counts is
    how many tokens a pass accepts, and a copy of the target agrees with it far more often
    than a smaller model does (docs/benchmarks.md, sessions 21 and 23: 3.9-4.9x AR against the
    sibling's 2.9-3.0x in the SSD scenario).  A resident target computing in bf16 (a CPU with bf16
    matrix instructions) verifies a small tree in little more than a one-token pass (0.31
    against 0.25 s), so the sibling's cheaper steps win there and it is taken first (6.08
    against 5.80 tok/s, session 21).  In float32 a tree pass is compute-bound on 2 cores (0.53
    against 0.24 s) and the count of passes rules again: the self draft decoded 6.16 tok/s
    against the sibling's 4.64 (session 31).  A 4-bit target streams 3.5x fewer bytes, so its pass is
    short and the draft's step cost counts more: its self draft is the int4 copy of its NF4
    weights (:func:`self_kind_for`; 1.26x the sibling's tok/s, where the int8 copy was 1.04x,
    session 24)."""
    if machine.device.type != "cpu":
        return sibling
    kind = self_kind_for(config.quant)
    load_bytes = self_draft_bytes(target, kind, machine.dtype)
    needed = int(load_bytes * RAM_HEADROOM)
    if needed > room:
        return sibling
    layers = "its own NF4 layers" if resolve_quant(config.quant) == "4bit" else "its own layers"
    fits = f"{layers} in {kind} ({needed / 1e9:.2f} of {room / 1e9:.1f} GB)"
    plan = place(load_bytes)  # the plan the loader will load by, should this draft be chosen
    speeds = _measured_speeds(config, target_ref, machine, (f"self:{kind}", plan), (sibling.name, place(sibling.load_bytes)))
    if speeds is not None:
        own, other = speeds
        if own <= other:
            return replace(sibling, reason=(
                f"draft {sibling.name}: measured faster here in these settings than self:{kind} "
                f"({other:.2f} against {own:.2f} tok/s of decoding)"
            ))
        return replace(_self_draft(target, kind, machine), reason=(
            f"draft self:{kind}: measured faster here in these settings than {sibling.name} "
            f"({own:.2f} against {other:.2f} tok/s of decoding); {fits}"
        ))
    streamed = target.num_layers - plan.resident_layers if plan.store_dtype is not None else 0
    if streamed:
        why = f"the target streams {streamed} of its {target.num_layers} layers from the disk every pass"
    elif machine.dtype == torch.float32:
        why = "the target computes in float32 here, where a pass over a tree costs twice a one-token pass"
    else:
        return sibling
    reason = f"draft self:{kind}: {why}, so the draft that agrees with it most pays: {fits} rather than {sibling.name}"
    return replace(_self_draft(target, kind, machine), reason=reason)


def self_kind_for(quant: str) -> str:
    """The self draft ``--draft auto`` weighs for a target of ``--quant quant``: int4 (of the NF4
    weights for a 4-bit target), whose steps read half int8's bytes for nearly its agreement
    (docs/benchmarks.md: 1.26x the sibling beside a 4-bit target where int8 was 1.04x, session 24;
    1.21x self:int8's tok/s beside the 16-bit demo target, session 26)."""
    return DEFAULT_SELF_KIND


def _measured_speeds(
    config: RunConfig, target_ref: ModelRef, machine: Machine, *drafts: tuple[str, OffloadPlan]
) -> tuple[float, ...] | None:
    """Each (draft name, the target's plan beside it)'s measured decoding tokens/s; None unless all were measured."""
    generation, path = config.generation(), speed_file()
    speeds = tuple(
        measured_speed(path, speed_key(target_ref.display, name, plan, machine.dtype, machine.device, config, generation))
        for name, plan in drafts
    )
    return None if None in speeds else speeds


def _self_draft(target: ModelFacts, kind: str, machine: Machine) -> DraftChoice:
    if machine.device.type != "cpu":
        raise InputError(
            f"--draft self runs on the CPU only so far, not on {machine.device.type}",
            "use --device cpu, or name a registered draft with --draft",
        )
    load_bytes = self_draft_bytes(target, kind, machine.dtype)
    reason = (
        f"draft self:{kind}: the target's own layers in {kind} ({load_bytes / 1e9:.2f} GB), "
        "sharing its embeddings and head; as configured"
    )
    return DraftChoice(None, target, reason, load_bytes, kind)


def _auto_draft(
    config: RunConfig, target_ref: ModelRef, target: ModelFacts, registry: dict[str, ModelEntry], machine: Machine,
    place: Placer, progress: Progress,
) -> DraftChoice:
    """The first draft models.toml lists for the target that is here, shares its tokenizer and fits.

    Tokenizers are compared on the real files (vocabulary and special tokens),
    not by family name; "fits" is the memory left once the target's own share is
    set aside (:func:`room_beside_target`).
    """
    candidates = list(target_ref.entry.drafts) if target_ref.entry else []
    room = room_beside_target(target, config.offload, config.ram_budget, machine.dtype, machine.device, machine.memory)
    if not candidates:
        return _self_draft_for_unpaired(config, target_ref, target, machine, room)
    target_tokenizer = load_tokenizer(target.path)
    skipped = []
    for name in candidates:
        ref = parse_model_spec(name, registry)
        try:
            facts = read_facts(materialize(ref, progress))
            check_same_tokenizer(target_tokenizer, load_tokenizer(facts.path), name)
        except SpecchatError as exc:  # absent, corrupt, or another tokenizer
            skipped.append(f"{name}: {exc.what}")
            continue
        load_bytes = draft_bytes(facts, int8_draft(config, machine.device), machine.dtype)
        needed = int(load_bytes * RAM_HEADROOM)
        if needed > room:
            skipped.append(f"{name}: needs {needed / 1e9:.1f} GB, {max(room, 0) / 1e9:.1f} GB left beside the target")
            continue
        reason = (
            f"draft {name}: the first registered draft of {target_ref.display} that is here, shares its tokenizer "
            f"and fits ({needed / 1e9:.1f} of {room / 1e9:.1f} GB)"
        )
        sibling = DraftChoice(ref, facts, reason + (f"; skipped {'; '.join(skipped)}" if skipped else ""), load_bytes)
        return _self_or_sibling(config, target_ref, target, machine, place, room, sibling)
    raise ModelNotFound(
        f"no registered draft of {target_ref.display} can be used: {'; '.join(skipped)}",
        f"`specchat setup {target_ref.spec}` fetches missing drafts; or lower --ram-budget, name a draft with --draft, "
        "or use --draft none",
    )
