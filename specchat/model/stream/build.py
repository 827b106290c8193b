"""A streamed target: embeddings, final norm and head resident, decoder layers from the layer store."""

from __future__ import annotations

import torch
from torch import nn

from specchat.common.errors import CorruptModel
from specchat.model.cpulinear import use_weight_left_linears
from specchat.model.lm import LayeredLM, UpcastEmbedding
from specchat.model.stream.device import DeviceStreamedLayers
from specchat.model.stream.host import StreamedLayers
from specchat.weights.store import RESIDENT, Store

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


def _resident_skeleton(store: Store, compute_dtype: torch.dtype, device: torch.device):
    """(the model with its resident tensors loaded and no decoder layers, its config, the layer class)."""
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
        raise CorruptModel(f"layer store {store.path} lacks {sorted(missing)[0]}", f"delete {store.path} and rebuild")
    skeleton.load_state_dict(weights, strict=False, assign=True)
    if embed_16bit is not None:
        skeleton.model.embed_tokens = UpcastEmbedding(embed_16bit, compute_dtype)
    skeleton.model.rotary_emb = rotary_class(config=config)
    if getattr(config, "tie_word_embeddings", False):  # one Parameter, so that .to(device) keeps one copy
        skeleton.lm_head.weight = skeleton.model.embed_tokens.weight
    skeleton.to(device).eval()
    return skeleton, config, layer_class


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
    skeleton, config, layer_class = _resident_skeleton(store, compute_dtype, device)
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
