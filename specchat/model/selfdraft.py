"""A draft made from the target itself (``--draft self``, ``self:int8``, ``self:int4``).

The draft is the target's own architecture: it calls the target's embedding table, rotary
table, final norm and LM head (the same tensors; for the draft's narrow steps the head may gain
a low-bit copy, where that measures faster: :mod:`specchat.model.drafthead`) and runs a
low-bit resident copy of the target's decoder layers (:mod:`specchat.weights.lowbit`), built
from the checkpoint one layer at a time, so the build's peak is one 16-bit layer beside the copy.  For a
4-bit (NF4) target the copy rounds the weights as the NF4 store holds them, the model that
target computes, not the 16-bit checkpoint it was rounded from.
Because it is the target with rounded weights, it agrees with the target far more often than
a smaller sibling model does (SubSpec, arXiv 2509.18344, section 3).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from specchat.common.errors import CorruptModel, ResourceError, reason
from specchat.common.files import LOCK, build_lock
from specchat.model.drafthead import copy_bytes, draft_head
from specchat.model.lm import LayeredLM, ResidentLayers
from specchat.sources.facts import LAYER_PREFIX, ModelFacts
from specchat.weights.layerfiles import LayerFiles
from specchat.weights.store import store_dir_for
from specchat.weights.lowbit import INT4_GROUP, LOWBIT_KINDS, layer_dtype, quantize_layer, rounding_identity, tune_int8
from specchat.weights.quant4 import quantizable, roundtrip_nf4

SELF = "self"
DEFAULT_SELF_KIND = "int4"  # half int8's bytes per step; docs/benchmarks.md, session 26
# Bytes per decoder weight, at most: int8 = 1 + one scale per output row (~0); int4 = 1/2 + two
# 16- or 32-bit numbers per group of INT4_GROUP weights (1/8 in bf16, 1/4 in float32).
SELF_BYTES_PER_WEIGHT = {"int8": 1.0, "int4": 0.5 + 8 / INT4_GROUP}


def self_draft_kind(spec: str) -> str | None:
    """``"self"`` -> the default kind (int4), ``"self:int8"`` -> ``"int8"``; None for any other draft spec."""
    name, _, kind = spec.partition(":")
    if name != SELF:
        return None
    kind = kind or DEFAULT_SELF_KIND
    if kind not in LOWBIT_KINDS:
        raise ValueError(f"a self draft is one of self, {', '.join(f'self:{k}' for k in LOWBIT_KINDS)}; got {spec!r}")
    return kind


def self_draft_dir(store_root: Path, facts: ModelFacts, kind: str, weights: str = "16bit") -> Path:
    """Where the low-bit copy of ``facts``'s model (its ``weights``: 16bit or 4bit) is kept: beside its layer stores."""
    return store_dir_for(store_root, facts.path, f"self-{kind}" + ("-of-nf4" if weights == "4bit" else ""))


@dataclass(frozen=True)
class _Copy:
    """What a low-bit copy is made of: the model, its rounding, the 16-bit dtype it computes in,
    and whether it copies the weights as the NF4 store holds them."""

    facts: ModelFacts
    kind: str
    dtype: torch.dtype
    of_nf4: bool = False

    @property
    def label(self) -> str:
        return self.kind + (" of the NF4 weights" if self.of_nf4 else "")


def self_draft_bytes(facts: ModelFacts, kind: str, dtype: torch.dtype) -> int:
    """RAM the low-bit layer copy takes beside a target computing in ``dtype``, with the largest
    copy of its head the draft may keep (:func:`~specchat.model.drafthead.copy_bytes`; the
    embeddings are the target's)."""
    config = facts.config
    head = copy_bytes(int(config.vocab_size), int(config.hidden_size), dtype)
    return _layer_bytes(facts, kind) + head


def _layer_bytes(facts: ModelFacts, kind: str) -> int:
    return int(facts.layer_elements * SELF_BYTES_PER_WEIGHT[kind])


def build_self_draft(
    target: LayeredLM, facts: ModelFacts, kind: str, progress: Callable[[str], None] = lambda message: None,
    shares_cache: bool = True, cache_dir: Path | None = None, weights: str = "16bit",
) -> LayeredLM:
    """``target``'s embeddings and head over a ``kind`` copy of its decoder layers, on the CPU; with
    ``shares_cache`` the engine gives it the target's keys and values for the committed prefix.
    ``weights`` are the target's: ``"4bit"`` copies the NF4 rounding of the checkpoint (what an NF4
    target computes with), ``"16bit"`` the checkpoint itself.

    With ``cache_dir`` the copy is kept there (:class:`LayerFiles`): loaded when a checked one of
    these weights is there, else built and written layer by layer (an interrupted build resumes).
    A cache that cannot be written costs only the time to build the copy again next run."""
    copy = _Copy(facts, kind, layer_dtype(target.dtype), weights == "4bit")
    meta = {"kind": kind, "dtype": str(copy.dtype)} | rounding_identity(kind, copy.dtype) | ({"weights": "nf4"} if copy.of_nf4 else {})
    files = LayerFiles(cache_dir, facts.path, facts.num_layers, meta) if cache_dir else None
    layers = _load_copy(files, copy, progress) if files is not None and files.complete() else None
    if layers is None and files is not None:
        layers = _build_locked(files, copy, progress)
    elif layers is None:
        layers = _build_copy(None, copy, progress)
    if kind == "int8":
        tune_int8(layers, copy.dtype)
    head, which = draft_head(target.lm_head, target.dtype)
    progress(f"self draft's head: {which}")
    return target.with_layers(ResidentLayers(layers), copy.dtype, shares_cache, head)


def _build_locked(files: LayerFiles, copy: _Copy, progress) -> list[nn.Module]:
    """Build under the directory's lock (a second process waits, then loads what the first built);
    a directory that cannot even be locked is a cache that cannot be kept."""
    with ExitStack() as held:
        try:
            held.enter_context(build_lock(files.path / LOCK, progress, f"building {files.path}"))
        except OSError as exc:
            _not_kept(files, exc, progress)
            return _build_copy(None, copy, progress)
        layers = _load_copy(files, copy, progress) if files.complete() else None
        return layers if layers is not None else _build_copy(files, copy, progress)


def _load_copy(files: LayerFiles, copy: _Copy, progress) -> list[nn.Module] | None:
    """The saved copy's layers, or None (with a note) where a file of it is damaged."""
    make_layer, layers = _layer_maker(copy.facts), []
    try:
        for index in range(copy.facts.num_layers):
            layers.append(_saved_layer(files, make_layer, index, copy))
    except (CorruptModel, RuntimeError) as exc:  # RuntimeError: tensors of other names or shapes
        progress(f"the saved self draft in {files.path} cannot be used ({getattr(exc, 'what', exc)}); building it again")
        return None
    progress(f"self draft ({copy.label}) loaded from {files.path}")
    return layers


def _build_copy(files: LayerFiles | None, copy: _Copy, progress) -> list[nn.Module]:
    """Quantise the checkpoint's layers one at a time, saving each where ``files`` says (if it can)."""
    facts = copy.facts
    files = _writable(files, _layer_bytes(facts, copy.kind), progress)
    tensors = _checkpoint_tensors(facts.path)
    make_layer, layers = _layer_maker(facts), []
    if copy.of_nf4:
        tensors = {name: _as_nf4(name, load) for name, load in tensors.items()}
    for index in range(facts.num_layers):
        if files is not None and files.has(index):  # written by an interrupted build of these weights
            layers.append(_saved_layer(files, make_layer, index, copy))
        else:
            layers.append(quantize_layer(make_layer(index, tensors).to(copy.dtype), copy.kind).eval())
            files = _save(files, index, layers[-1], progress)
        if index + 1 in (1, facts.num_layers) or (index + 1) % 8 == 0:
            progress(f"building the self draft ({copy.label}): {index + 1}/{facts.num_layers} layers")
    if files is not None:
        try:
            files.finish()
        except (OSError, ResourceError) as exc:
            _not_kept(files, exc, progress)
    return layers


def _as_nf4(name: str, load: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """A loader of tensor ``name`` as the 4-bit store keeps it: a decoder layer's 2-D weight
    rounded to NF4 and back (the same rounding, of the same checkpoint tensor); others as they are."""
    if not name.startswith(LAYER_PREFIX):
        return load

    def rounded() -> torch.Tensor:
        tensor = load()
        return roundtrip_nf4(tensor) if quantizable(name, tuple(tensor.shape)) else tensor

    return rounded


def _saved_layer(files: LayerFiles, make_layer, index: int, copy: _Copy) -> nn.Module:
    shell = quantize_layer(make_layer(index, None).to(copy.dtype), copy.kind, shell=True)
    shell.load_state_dict(files.read(index), strict=True, assign=True)
    return shell.eval()


def _writable(files: LayerFiles | None, needed_bytes: int, progress) -> LayerFiles | None:
    if files is None:
        return None
    try:
        files.start(needed_bytes)
        return files
    except (OSError, ResourceError) as exc:
        return _not_kept(files, exc, progress)


def _save(files: LayerFiles | None, index: int, layer: nn.Module, progress) -> LayerFiles | None:
    if files is None:
        return None
    try:
        files.write(index, layer.state_dict())
        return files
    except (OSError, ResourceError) as exc:
        return _not_kept(files, exc, progress)


def _not_kept(files: LayerFiles, exc: Exception, progress) -> None:
    progress(f"cannot keep the self draft in {files.path} ({reason(exc)}); it is built again each run")


def _layer_maker(facts: ModelFacts) -> Callable[[int, dict], nn.Module]:
    """A function (layer index, checkpoint tensors) -> that decoder layer with its checkpoint weights."""
    from transformers import AutoModelForCausalLM

    config = facts.config
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        layer_class = type(AutoModelForCausalLM.from_config(config).model.layers[0])

    def make(index: int, tensors: dict | None) -> nn.Module:
        """Layer ``index`` with the checkpoint's weights, or on the meta device when ``tensors`` is None."""
        prefix = f"{LAYER_PREFIX}{index}."
        with torch.device("meta"):
            layer = layer_class(config, index)
        if tensors is None:
            return layer
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
