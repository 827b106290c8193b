"""Building the offloaded target: resident embeddings/norm/head, decoder layers from the store.

Modes (``--offload``), on a CPU:
  none  every layer resident (loaded straight from the model directory)
  ram   the same as none: host RAM *is* the compute device's memory
  ssd   layers stream from the store on every pass, except those that fit ``--ram-budget``
  auto  none when the model fits the available RAM, else ssd

On a GPU (:func:`plan_offload_gpu`) the layers that fit the free VRAM stay there
in every mode; of the rest, ``ram`` keeps all in pinned host RAM and ``ssd`` keeps
those that fit ``--ram-budget`` and reads the others from the store; all of them
are copied to the GPU on every pass (:mod:`specchat.devicestream`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .cpulinear import use_weight_left_linears
from .lm import LayeredLM, UpcastEmbedding
from .store import RESIDENT, Store
from .devicestream import DeviceStreamedLayers
from .streamer import StreamedLayers


@dataclass(frozen=True)
class OffloadPlan:
    mode: str  # "none" | "ssd" on a CPU; "none" | "ram" | "ssd" on a GPU
    resident_layers: int  # decoder layers kept in the compute device's memory (CPU: RAM; GPU: VRAM)
    reason: str
    host_layers: int = 0  # GPU only: layers waiting in pinned host RAM, copied to the GPU every pass


GPU_RING = 2  # device slots the streamed layers pass through
GPU_HEADROOM = 0.1  # of the free VRAM, kept for the KV cache, activations and logits (at least 1 GB)


def layer_compute_bytes(store: Store, compute_dtype: torch.dtype) -> int:
    """RAM one decoder layer takes once converted to the compute dtype."""
    elements = sum(torch.Size(slot.shape).numel() for slot in store.layout)
    return elements * torch.finfo(compute_dtype).bits // 8


def plan_offload(
    mode: str, store_layers: int, layer_bytes: int, model_bytes: int, available_ram: int, ram_budget: int | None
) -> OffloadPlan:
    """Decide where the target's layers live.  All sizes in bytes, in the compute dtype.

    ``ram`` means "layers in host RAM": on a CPU that is the compute device's memory, i.e. resident.
    """
    if mode == "ram":
        return OffloadPlan("none", store_layers, "offload none: --offload ram (on a CPU the layers in RAM are resident)")
    if mode == "auto":
        fits = model_bytes * 1.2 < available_ram and ram_budget is None
        mode = "none" if fits else "ssd"
        why = "the target fits in RAM" if fits else "the target does not fit in RAM" if ram_budget is None else "--ram-budget is set"
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
        if model_bytes * 1.2 < vram_free and ram_budget is None:
            mode, why = "none", "the target fits the GPU"
        elif layers * stored_layer_bytes * 1.2 < available_ram and ram_budget is None:
            mode, why = "ram", "the target does not fit the GPU but fits in RAM"
        else:
            mode = "ssd"
            why = "--ram-budget is set" if ram_budget is not None else "the target fits neither the GPU nor RAM"
    else:
        why = f"--offload {mode}"
    if mode == "none":
        return OffloadPlan("none", layers, f"offload none: {why}; every layer on the GPU")
    headroom = max(int(vram_free * GPU_HEADROOM), 1 << 30)
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


EMBED = "model.embed_tokens.weight"


def _resident_weights(store: Store, compute_dtype: torch.dtype, tied: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The store's resident tensors in the compute dtype, one at a time (no second full copy in RAM);
    an untied 16-bit embedding table is returned apart, as stored (see :class:`UpcastEmbedding`)."""
    from safetensors import safe_open

    weights, embed_16bit = {}, None
    with safe_open(str(store.path / RESIDENT), framework="pt") as handle:
        names = list(handle.keys())
        tied = tied or "lm_head.weight" not in names
        for name in names:
            tensor = handle.get_tensor(name)
            if name == EMBED and not tied and compute_dtype == torch.float32 and tensor.dtype in (torch.float16, torch.bfloat16):
                embed_16bit = tensor
            else:
                weights[name] = tensor.to(compute_dtype)
    if tied and "lm_head.weight" not in weights and EMBED in weights:
        weights["lm_head.weight"] = weights[EMBED]
    return weights, embed_16bit


def load_streamed(
    store: Store,
    compute_dtype: torch.dtype = torch.float32,
    resident_layers: int = 0,
    ring: int | None = None,
    direct: bool = True,
    device: torch.device | str = "cpu",
    host_layers: int = 0,
    copy_to_device: bool | None = None,
    keep_files: bool = False,
) -> LayeredLM:
    """A :class:`LayeredLM` whose decoder layers stream from ``store``.

    On a CPU the first ``resident_layers`` stay in RAM and the rest are read every pass.
    On another device the first ``resident_layers`` stay on it, the next ``host_layers``
    wait in pinned host RAM and the rest are read from the store; all but the first are
    copied to the device every pass.  With ``keep_files`` the first ``resident_layers`` stay
    on the device as layer files (4-bit) instead of modules.  ``copy_to_device`` forces that host -> device ring even
    on a CPU (None: only for another device), which is how tests run it without a GPU.
    """
    device = torch.device(device)
    if copy_to_device is None:
        copy_to_device = device.type != "cpu"
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(store.path)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=compute_dtype, attn_implementation="sdpa")
    layer_class = type(skeleton.model.layers[0])
    rotary_class = type(skeleton.model.rotary_emb)
    skeleton.model.layers = nn.ModuleList()
    weights, embed_16bit = _resident_weights(store, compute_dtype, getattr(config, "tie_word_embeddings", False))
    missing = set(dict(skeleton.named_parameters())) - set(weights) - ({EMBED} if embed_16bit is not None else set())
    if missing:
        from .errors import CorruptModel

        raise CorruptModel(f"layer store {store.path} lacks {sorted(missing)[0]}", f"delete {store.path} and rebuild")
    skeleton.load_state_dict(weights, strict=False, assign=True)
    if embed_16bit is not None:
        skeleton.model.embed_tokens = UpcastEmbedding(embed_16bit, compute_dtype)
    skeleton.model.rotary_emb = rotary_class(config=config)
    if getattr(config, "tie_word_embeddings", False):  # one Parameter, so that .to(device) keeps one copy
        skeleton.lm_head.weight = skeleton.model.embed_tokens.weight
    skeleton.to(device).eval()
    on_cpu = device.type == "cpu"
    if on_cpu:
        use_weight_left_linears(skeleton)

    def make_layer(index: int) -> nn.Module:
        with torch.device("meta"):
            layer = layer_class(config, index)
        layer = layer.to(compute_dtype).to_empty(device=device).eval()  # no float32 transient
        return use_weight_left_linears(layer) if on_cpu else layer

    if not copy_to_device:
        source = StreamedLayers(store, make_layer, resident=set(range(resident_layers)), ring=ring, direct=direct)
    else:
        source = DeviceStreamedLayers(
            store,
            make_layer,
            device,
            host=set(range(resident_layers, min(resident_layers + host_layers, store.num_layers))),
            device_resident=set() if keep_files else set(range(resident_layers)),
            device_files=set(range(resident_layers)) if keep_files else set(),
            ring=ring or 2,
            direct=direct,
        )
    return LayeredLM(skeleton, source)
