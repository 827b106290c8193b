"""Where the target's layers live: one decision from the model's facts, the free memory and the
user's budgets, used alike by loading, `setup`, `models` and `detect`.

Modes (``--offload``), on a CPU:
  none  every layer resident (loaded straight from the model directory)
  ram   the same as none: host RAM *is* the compute device's memory
  ssd   layers stream from the store on every pass, except those that fit ``--ram-budget``
  auto  none when the model fits the available RAM, else ssd

On a GPU (:func:`plan_offload_gpu`) the layers that fit the free VRAM stay there
in every mode; of the rest, ``ram`` keeps all in pinned host RAM and ``ssd`` keeps
those that fit ``--ram-budget`` and reads the others from the store; all of them
are copied to the GPU on every pass (:mod:`specchat.model.stream.device`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import psutil
import torch

from specchat.common.errors import ResourceError
from specchat.sources.facts import ModelFacts
from specchat.weights.precision import dtype_name
from specchat.weights.store import store_layout

FIT_MARGIN = 1.2  # a model fits a memory when its weights x this are below what is free
RAM_HEADROOM = 1.1  # pre-flights: activations, KV cache and allocator slack over the raw weights
GPU_RING = 2  # device slots the streamed layers pass through
GPU_HEADROOM = 0.1  # of the free VRAM, kept for the KV cache, activations and logits (at least 1 GB)
GPU_LEAST_HEADROOM = 1 << 30


@dataclass(frozen=True)
class OffloadPlan:
    mode: str  # "none" | "ssd" on a CPU; "none" | "ram" | "ssd" on a GPU
    resident_layers: int  # decoder layers kept in the compute device's memory (CPU: RAM; GPU: VRAM)
    reason: str
    host_layers: int = 0  # GPU only: layers waiting in pinned host RAM, copied to the GPU every pass
    quant: str = "16bit"  # the target's weights: "16bit" or "4bit" (NF4)
    store_dtype: str | None = None  # the layer store it needs ("bfloat16", "float16", "nf4"), None for none
    layer_file_bytes: int = 0  # one layer file of that store
    on_gpu: bool = False  # planned for a GPU: streamed layers go host -> device every pass


@dataclass(frozen=True)
class Memory:
    """Free memory when the plan is made (bytes)."""

    ram_available: int
    vram_free: int = 0  # on the compute GPU; 0 on a CPU


@dataclass(frozen=True)
class Machine:
    """Where the models will compute, decided once per load."""

    device: torch.device
    dtype: torch.dtype  # the target's compute dtype
    memory: Memory


def free_memory(device: torch.device) -> Memory:
    vram = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    return Memory(psutil.virtual_memory().available, vram)


def resolve_device(choice: str) -> torch.device:
    """``--device``: auto = the first CUDA GPU torch sees, else the CPU."""
    if choice == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if choice == "cuda":
        raise ResourceError(
            "--device cuda: torch sees no CUDA GPU",
            "install a CUDA build of torch (pip install torch --index-url https://download.pytorch.org/whl/cu128) "
            "or use --device cpu",
        )
    return torch.device("cpu")


def fits(needed: int, free: int) -> bool:
    return needed * FIT_MARGIN < free


def resolve_quant(quant: str) -> str:
    """``--quant auto``: 16-bit, the target's own outputs (4-bit NF4 is faster to stream but a different model)."""
    return "16bit" if quant == "auto" else quant


def store_dtype_for(quant: str, facts: ModelFacts, compute_dtype: torch.dtype) -> str:
    """The layer store's dtype for ``--quant``: NF4 for 4bit; else the compute dtype when that is
    16-bit (a streamed layer is then used as read, with no conversion), or the model's own 16 bits."""
    if resolve_quant(quant) == "4bit":
        return "nf4"
    return dtype_name(compute_dtype) if compute_dtype in (torch.float16, torch.bfloat16) else facts.stored_dtype


def place_target(
    facts: ModelFacts,
    offload: str,
    quant: str,
    ram_budget: int | None,
    dtype: torch.dtype,
    device: torch.device,
    memory: Memory,
    draft_bytes: int = 0,
) -> OffloadPlan:
    """Where every layer of the target lives beside a draft of ``draft_bytes``, and why."""
    quant = resolve_quant(quant)
    four_bit = quant == "4bit"
    store_dtype = store_dtype_for(quant, facts, dtype)
    file_bytes = store_layout(facts.layer_shapes, store_dtype, facts.stored_dtype)[1]
    layer_bytes = facts.layer_bytes(dtype)
    if device.type == "cuda":
        plan = plan_offload_gpu(
            offload, facts.num_layers, layer_bytes, file_bytes, facts.other_bytes(dtype),
            memory.vram_free - draft_bytes, memory.ram_available, ram_budget, keep_files=four_bit,
        )
        plan = replace(plan, on_gpu=True)
        if four_bit:
            plan = replace(plan, reason=f"{plan.reason} (4-bit NF4 layer files)")
    else:
        available = max(memory.ram_available - draft_bytes, 0)
        plan = plan_offload(offload, facts.num_layers, layer_bytes, facts.total_bytes(dtype), available, ram_budget)
        if plan.mode == "none" and four_bit:  # every layer dequantised once and kept
            plan = replace(plan, reason=f"{plan.reason}; 4-bit NF4 weights from the layer store")
        elif plan.mode == "ssd":
            plan = replace(plan, reason=f"{plan.reason} ({'4-bit NF4' if four_bit else store_dtype})")
    needs_store = plan.mode != "none" or four_bit
    return replace(plan, quant=quant, store_dtype=store_dtype if needs_store else None, layer_file_bytes=file_bytes)


def draft_bytes(facts: ModelFacts, int8: bool, dtype: torch.dtype) -> int:
    """The draft's loading peak: on a CPU an int8 draft from a 16-bit checkpoint peaks at about twice
    the 16-bit weights, i.e. its float32 size (benchmarks/draft_load_peak.py); else its size in ``dtype``."""
    return facts.total_bytes(torch.float32 if int8 else dtype)


def room_beside_target(
    facts: ModelFacts, offload: str, ram_budget: int | None, dtype: torch.dtype, device: torch.device, memory: Memory
) -> int:
    """Memory of the compute device available beside the target (for the draft).

    CPU: RAM minus all of the target when resident (``none``/``ram``), else minus its non-layer
    weights, the layers ``--ram-budget`` keeps, and a ring of two streamed layers.
    GPU: free VRAM minus the target's least share (non-layer weights, two slots of a layer and
    its file -- 4 layers' worth -- and 1 GiB of headroom); the draft goes first, the target's
    layers fill what it leaves.
    """
    per_layer = facts.layer_bytes(dtype)
    if device.type == "cuda":
        return memory.vram_free - (facts.other_bytes(dtype) + 4 * per_layer + GPU_LEAST_HEADROOM)
    if offload in ("none", "ram"):
        floor = facts.total_bytes(dtype)
    else:
        kept = min(ram_budget or 0, facts.num_layers * per_layer)
        floor = facts.other_bytes(dtype) + kept + 2 * per_layer
    return memory.ram_available - int(floor * RAM_HEADROOM)


def check_ram(needed: int, available: int, what: str) -> None:
    if needed * RAM_HEADROOM > available:
        raise ResourceError(
            f"not enough RAM to {what}: {needed * RAM_HEADROOM / 1e9:.1f} GB needed, {available / 1e9:.1f} GB available",
            "use --offload ssd with a smaller --ram-budget, close other programs, or pick a smaller model",
        )


def tree_bytes(facts: ModelFacts, budget: int, dtype: torch.dtype) -> int:
    """RAM one speculation pass over a tree of ``budget`` tokens takes beyond the weights, counted
    generously.  Per tree token: its logits in the compute dtype, the target's and the draft's
    float32 probabilities over the vocabulary V (V (w + 8) bytes, w = the dtype's width), the
    MLP's activations (3 I w), its keys and values in every layer (2 L kv w); per pair of a
    tree token and a context position (the context up to the model's length C): the
    visibility mask and its additive form (1 + w bytes)."""
    config, width = facts.config, torch.finfo(dtype).bits // 8
    vocab, hidden = int(config.vocab_size), int(config.hidden_size)
    heads = int(getattr(config, "num_attention_heads", 1))
    kv_width = int(getattr(config, "num_key_value_heads", heads)) * int(getattr(config, "head_dim", None) or hidden // heads)
    intermediate = int(getattr(config, "intermediate_size", 4 * hidden))
    context = int(getattr(config, "max_position_embeddings", 4096))
    per_token = vocab * (width + 8) + 3 * intermediate * width + 2 * facts.num_layers * kv_width * width + 8 * hidden * width
    return budget * per_token + budget * (context + budget) * (1 + width)


def largest_tree(facts: ModelFacts, dtype: torch.dtype, available: int) -> int:
    """The largest power-of-two budget (up to 2^15) whose tree fits ``available`` bytes; 0 if none."""
    return max((b for b in (2**i for i in range(16)) if tree_bytes(facts, b, dtype) <= available), default=0)


def check_tree(facts: ModelFacts, budget: int, dtype: torch.dtype, available: int) -> None:
    """Refuse, before loading, a ``--budget`` whose tree the RAM left beside the models cannot hold."""
    needed = tree_bytes(facts, budget, dtype)
    if needed <= available:
        return
    fits = largest_tree(facts, dtype, available)
    fix = f"use --budget {fits} or less, or --budget auto" if fits else "close other programs or pick a smaller model"
    raise ResourceError(
        f"--budget {budget} needs about {needed / 1e9:.1f} GB of RAM for its tree's logits and activations, "
        f"{max(available, 0) / 1e9:.1f} GB are left beside the models",
        fix,
    )


def check_vram(needed: int, free: int, device: torch.device, what: str) -> None:
    if needed > free:
        raise ResourceError(
            f"not enough GPU memory to {what} on {device}: {needed / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free",
            "use --offload ram or ssd, --quant 4bit, a smaller draft, or close other GPU programs",
        )


def choose_cpu_mode(model_bytes: int, available_ram: int, ram_budget: int | None) -> tuple[str, str]:
    """``--offload auto`` on a CPU: (mode, why)."""
    if fits(model_bytes, available_ram) and ram_budget is None:
        return "none", "the target fits in RAM"
    return "ssd", "the target does not fit in RAM" if ram_budget is None else "--ram-budget is set"


def choose_gpu_mode(gpu_bytes: int, layer_files_bytes: int, vram_free: int, available_ram: int, ram_budget: int | None) -> tuple[str, str]:
    """``--offload auto`` on a GPU: (mode, why).  ``gpu_bytes``: the whole target as it would sit
    on the GPU; ``layer_files_bytes``: all its layer files, as pinned RAM would hold them."""
    if fits(gpu_bytes, vram_free) and ram_budget is None:
        return "none", "the target fits the GPU"
    if fits(layer_files_bytes, available_ram) and ram_budget is None:
        return "ram", "the target does not fit the GPU but fits in RAM"
    return "ssd", "--ram-budget is set" if ram_budget is not None else "the target fits neither the GPU nor RAM"


def plan_offload(
    mode: str, store_layers: int, layer_bytes: int, model_bytes: int, available_ram: int, ram_budget: int | None
) -> OffloadPlan:
    """Decide where the target's layers live.  All sizes in bytes, in the compute dtype.

    ``ram`` means "layers in host RAM": on a CPU that is the compute device's memory, i.e. resident.
    """
    if mode == "ram":
        return OffloadPlan("none", store_layers, "offload none: --offload ram (on a CPU the layers in RAM are resident)")
    if mode == "auto":
        mode, why = choose_cpu_mode(model_bytes, available_ram, ram_budget)
    else:
        why = f"--offload {mode}"
    if mode == "none":
        return OffloadPlan("none", store_layers, f"offload none: {why}")
    budget = ram_budget if ram_budget is not None else max(available_ram // 2 - 2 * layer_bytes, 0)
    resident = min(store_layers, max(budget // layer_bytes, 0))
    return OffloadPlan(
        "ssd",
        resident,
        f"offload ssd: {why}; {resident} of {store_layers} layers stay in RAM, {store_layers - resident} stream",
    )


def plan_offload_gpu(
    mode: str,
    layers: int,
    layer_bytes: int,
    stored_layer_bytes: int,
    other_bytes: int,
    vram_free: int,
    available_ram: int,
    ram_budget: int | None,
    keep_files: bool = False,
) -> OffloadPlan:
    """Where the target's layers live when a GPU computes.  Sizes in bytes: ``layer_bytes`` one
    layer in the compute dtype on the GPU, ``stored_layer_bytes`` one layer file (16-bit or NF4),
    ``other_bytes`` the embeddings, norm and head; ``vram_free`` is what is left beside the draft.
    ``keep_files``: layers stay on the GPU as their (4-bit) files, dequantised every pass."""
    kept_bytes = stored_layer_bytes if keep_files else layer_bytes  # one layer that stays on the GPU
    model_bytes = other_bytes + layers * kept_bytes + (GPU_RING * layer_bytes if keep_files else 0)
    if mode == "auto":
        mode, why = choose_gpu_mode(model_bytes, layers * stored_layer_bytes, vram_free, available_ram, ram_budget)
    else:
        why = f"--offload {mode}"
    if mode == "none":
        return OffloadPlan("none", layers, f"offload none: {why}; every layer on the GPU")
    headroom = max(int(vram_free * GPU_HEADROOM), GPU_LEAST_HEADROOM)
    room = vram_free - other_bytes - GPU_RING * (layer_bytes + stored_layer_bytes) - headroom
    on_gpu = min(layers, max(room // max(kept_bytes, 1), 0))
    rest = layers - on_gpu
    if mode == "ram":
        host = rest
    else:
        budget = ram_budget if ram_budget is not None else max(available_ram // 2 - 2 * stored_layer_bytes, 0)
        host = min(rest, max(budget // max(stored_layer_bytes, 1), 0))
    return OffloadPlan(
        mode,
        on_gpu,
        f"offload {mode}: {why}; {on_gpu} of {layers} layers stay on the GPU, {host} wait in pinned RAM, "
        f"{rest - host} stream from the store",
        host_layers=host,
    )
