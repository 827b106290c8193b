"""Building the offloaded target: resident embeddings/norm/head, decoder layers from the store.

Modes (``--offload``):
  none  every layer resident (loaded straight from the model directory)
  ssd   layers stream from the store on every pass, except those that fit ``--ram-budget``
  auto  none when the model fits the available RAM, else ssd
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .cpulinear import use_weight_left_linears
from .lm import LayeredLM
from .store import RESIDENT, Store
from .streamer import StreamedLayers


@dataclass(frozen=True)
class OffloadPlan:
    mode: str  # "none" | "ssd"
    resident_layers: int  # decoder layers kept in RAM (ssd mode)
    reason: str


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


def load_streamed(
    store: Store, compute_dtype: torch.dtype = torch.float32, resident_layers: int = 0, ring: int = 2, direct: bool = True
) -> LayeredLM:
    """A :class:`LayeredLM` whose decoder layers stream from ``store``."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(store.path)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=compute_dtype, attn_implementation="sdpa")
    layer_class = type(skeleton.model.layers[0])
    rotary_class = type(skeleton.model.rotary_emb)
    skeleton.model.layers = nn.ModuleList()
    weights = {name: t.to(compute_dtype) for name, t in load_file(str(store.path / RESIDENT)).items()}
    if "lm_head.weight" not in weights and getattr(config, "tie_word_embeddings", False):
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    missing = set(dict(skeleton.named_parameters())) - set(weights)
    if missing:
        from .errors import CorruptModel

        raise CorruptModel(f"layer store {store.path} lacks {sorted(missing)[0]}", f"delete {store.path} and rebuild")
    skeleton.load_state_dict(weights, strict=False, assign=True)
    skeleton.model.rotary_emb = rotary_class(config=config)
    skeleton.eval()
    use_weight_left_linears(skeleton)

    def make_layer(index: int) -> nn.Module:
        with torch.device("meta"):
            layer = layer_class(config, index)
        return use_weight_left_linears(layer.to_empty(device="cpu").to(compute_dtype).eval())

    source = StreamedLayers(store, make_layer, resident=set(range(resident_layers)), ring=ring, direct=direct)
    return LayeredLM(skeleton, source)
