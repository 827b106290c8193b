"""Loading the target where its :class:`OffloadPlan` puts it: resident, or streamed from the layer
store (on a CPU from disk; on a GPU from pinned RAM or the store), after a memory pre-flight."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from specchat.model.loading import LoadedModel, load_resident, load_tokenizer
from specchat.model.placement import GPU_RING, Machine, OffloadPlan, check_ram, check_vram
from specchat.model.stream.build import load_streamed
from specchat.model.stream.host import RING
from specchat.sources.facts import ModelFacts
from specchat.weights.store import Store, build_store, store_dir_for

Progress = Callable[[str], None]


def open_layer_store(facts: ModelFacts, plan: OffloadPlan, store_root: Path, progress: Progress) -> Store:
    """The plan's layer store under ``store_root``: built (or finished) if needed, then opened."""

    def report(done: int, total: int) -> None:
        if done == 1 or done == total or done % 8 == 0:
            progress(f"building the layer store: {done}/{total} layers")

    path = store_dir_for(store_root, facts.path, plan.store_dtype)
    return build_store(facts.path, path, plan.store_dtype, report, dense_dtype=facts.stored_dtype, notice=progress)


def target_ram_bytes(facts: ModelFacts, plan: OffloadPlan, dtype) -> int:
    """Host RAM the target takes where a CPU plan puts it: every weight when resident; else the
    kept layers, embeddings and head, and the ring (RING read buffers and RING layer slots, or,
    with no conversion, twice as many buffers that are the slots)."""
    if plan.store_dtype is None:
        return facts.total_bytes(dtype)
    layer_bytes = facts.layer_bytes(dtype)
    ring = RING * (plan.layer_file_bytes + layer_bytes) if plan.resident_layers < facts.num_layers else 0
    return plan.resident_layers * layer_bytes + ring + facts.other_bytes(dtype)


def load_target(
    facts: ModelFacts, plan: OffloadPlan, machine: Machine, draft_bytes: int, store_root: Path, progress: Progress
) -> LoadedModel:
    """The target as ``plan`` places it, beside a draft of ``draft_bytes``; refuses before loading
    what the free ``memory`` cannot hold.  A plan made for a GPU is loaded with the GPU's
    streaming ring on ``device`` (tests run it with the CPU standing in)."""
    if plan.on_gpu:
        return _load_on_gpu(facts, plan, machine, draft_bytes, lambda: open_layer_store(facts, plan, store_root, progress))
    dtype, memory = machine.dtype, machine.memory
    if plan.store_dtype is None:
        check_ram(target_ram_bytes(facts, plan, dtype) + draft_bytes, memory.ram_available, "hold the models")
        return load_resident(facts.path, dtype, facts=facts)
    check_ram(target_ram_bytes(facts, plan, dtype) + draft_bytes, memory.ram_available, "stream the target")
    store = open_layer_store(facts, plan, store_root, progress)
    lm = load_streamed(store, dtype, resident_layers=plan.resident_layers)
    return LoadedModel(lm, load_tokenizer(facts.path), facts.path)


def _load_on_gpu(
    facts: ModelFacts, plan: OffloadPlan, machine: Machine, draft_bytes: int, open_store: Callable[[], Store]
) -> LoadedModel:
    """Resident when it fits, else its layers copied in every pass from pinned host RAM or the
    store (:mod:`specchat.model.stream.device`); a 4-bit target keeps its packed layer files on
    the GPU and dequantises them there."""
    dtype, device, memory = machine.dtype, machine.device, machine.memory
    layer_bytes, other_bytes = facts.layer_bytes(dtype), facts.other_bytes(dtype)
    vram_free = memory.vram_free - draft_bytes
    four_bit = plan.quant == "4bit"
    if plan.store_dtype is None:
        check_vram(other_bytes + facts.num_layers * layer_bytes, vram_free, device, "hold the target")
        return load_resident(facts.path, dtype, str(device), facts=facts)
    file_bytes = plan.layer_file_bytes
    kept = plan.resident_layers * (file_bytes if four_bit else layer_bytes)
    check_vram(other_bytes + kept + GPU_RING * (layer_bytes + file_bytes), vram_free, device, "stream the target")
    streams_from_store = plan.resident_layers + plan.host_layers < facts.num_layers
    staging = 2 * file_bytes if streams_from_store else 0
    check_ram(plan.host_layers * file_bytes + staging, memory.ram_available, "hold the target's layers in pinned RAM")
    store = open_store()
    lm = load_streamed(
        store, dtype, resident_layers=plan.resident_layers, device=device, host_layers=plan.host_layers,
        copy_to_device=True, keep_files=four_bit,
    )
    return LoadedModel(lm, load_tokenizer(facts.path), facts.path)
