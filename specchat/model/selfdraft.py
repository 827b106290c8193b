"""A draft made from the target itself (``--draft self``, ``self:int8``, ``self:int4``).

The draft is the target's own architecture: it calls the target's embedding table, rotary
table, final norm and LM head (the same tensors, no second copy) and runs a low-bit resident
copy of the target's decoder layers (:mod:`specchat.weights.lowbit`), built from the
checkpoint one layer at a time, so the build's peak is one 16-bit layer beside the copy.
Because it is the target with rounded weights, it agrees with the target far more often than
a smaller sibling model does (SubSpec, arXiv 2509.18344, section 3).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from specchat.common.errors import CorruptModel
from specchat.model.lm import LayeredLM, ResidentLayers
from specchat.sources.facts import LAYER_PREFIX, ModelFacts
from specchat.weights.lowbit import LOWBIT_KINDS, layer_dtype, quantize_layer

SELF = "self"
DEFAULT_SELF_KIND = "int8"
# Bytes per decoder weight: int8 = 1 + one scale per output row (~0); int4 = 1/2 + two 16- or
# 32-bit numbers per 64 weights (<= 1/8).
_BYTES_PER_WEIGHT = {"int8": 1.0, "int4": 0.625}


def self_draft_kind(spec: str) -> str | None:
    """``"self"`` -> the default kind, ``"self:int4"`` -> ``"int4"``; None for any other draft spec."""
    name, _, kind = spec.partition(":")
    if name != SELF:
        return None
    kind = kind or DEFAULT_SELF_KIND
    if kind not in LOWBIT_KINDS:
        raise ValueError(f"a self draft is one of self, {', '.join(f'self:{k}' for k in LOWBIT_KINDS)}; got {spec!r}")
    return kind


def self_draft_bytes(facts: ModelFacts, kind: str) -> int:
    """RAM the low-bit layer copy takes (the embeddings and head are the target's)."""
    return int(facts.layer_elements * _BYTES_PER_WEIGHT[kind])


def build_self_draft(
    target: LayeredLM, facts: ModelFacts, kind: str, progress: Callable[[str], None] = lambda message: None,
    shares_cache: bool = True,
) -> LayeredLM:
    """``target``'s embeddings and head over a ``kind`` copy of its decoder layers, on the CPU; with
    ``shares_cache`` the engine gives it the target's keys and values for the committed prefix."""
    make_layer = _layer_maker(facts)
    tensors = _checkpoint_tensors(facts.path)
    dtype = layer_dtype(target.dtype)
    layers = []
    for index in range(facts.num_layers):
        layer = make_layer(index, tensors).to(dtype)
        layers.append(quantize_layer(layer, kind).eval())
        if index + 1 in (1, facts.num_layers) or (index + 1) % 8 == 0:
            progress(f"building the self draft ({kind}): {index + 1}/{facts.num_layers} layers")
    return target.with_layers(ResidentLayers(layers), dtype, shares_cache)


def _layer_maker(facts: ModelFacts) -> Callable[[int, dict], nn.Module]:
    """A function (layer index, checkpoint tensors) -> that decoder layer with its 16-bit weights."""
    from transformers import AutoModelForCausalLM

    config = facts.config
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        layer_class = type(AutoModelForCausalLM.from_config(config).model.layers[0])

    def make(index: int, tensors: dict) -> nn.Module:
        prefix = f"{LAYER_PREFIX}{index}."
        with torch.device("meta"):
            layer = layer_class(config, index)
        state = {name[len(prefix):]: tensors[name]() for name in tensors if name.startswith(prefix)}
        try:
            layer.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:  # a missing or misshapen tensor
            raise CorruptModel(
                f"cannot build the self draft from {facts.path}: layer {index} does not match its config",
                "re-download or re-convert the model",
            ) from exc
        return layer

    return make


def _checkpoint_tensors(model_dir: Path) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> a loader of that tensor, over every safetensors file of the checkpoint."""
    from safetensors import safe_open

    loaders = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        handle = safe_open(str(file), framework="pt")
        for name in handle.keys():
            loaders[name] = lambda handle=handle, name=name: handle.get_tensor(name)
    return loaders
