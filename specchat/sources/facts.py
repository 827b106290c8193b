"""What a checkpoint is, read once from its files: architecture, layers, tensor sizes, stored dtypes.

Everything that sizes or places a model (memory pre-flights, the offload plan, the layer
store's file size, the draft's room) works from one :class:`ModelFacts`, built by
:func:`read_facts` from the ``config.json`` and the safetensors headers alone -- no weight
is read.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specchat.common.errors import CorruptModel

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral", "mixtral", "qwen3")
LAYER_PREFIX = "model.layers."
EMBED = "model.embed_tokens.weight"
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_WIDTHS = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1}


@dataclass(frozen=True)
class ModelFacts:
    path: Path
    config: Any  # the transformers config (``num_hidden_layers``, ``hidden_size``, ...)
    num_layers: int
    layer_shapes: tuple[tuple[str, tuple[int, ...]], ...]  # layer 0's tensors: (name within the layer, shape)
    layer_elements: int  # weights of all decoder layers together
    other_elements: int  # embeddings, final norm, LM head
    dtypes: frozenset[str]  # safetensors dtypes of the files ("BF16", "F16", "F32", ...)
    embed_dtype: torch.dtype | None  # the embedding table's dtype in the checkpoint

    @property
    def architecture(self) -> str:
        return self.config.model_type

    @property
    def stored_dtype(self) -> str:
        """The 16-bit dtype a layer store keeps: the model's own, bf16 for a float32 model."""
        return "float16" if self.dtypes == {"F16"} else "bfloat16"

    def layer_bytes(self, dtype: torch.dtype) -> int:
        """One decoder layer in ``dtype``."""
        return self.layer_elements * _bytes(dtype) // max(self.num_layers, 1)

    def other_bytes(self, dtype: torch.dtype) -> int:
        """Embeddings, final norm and head in ``dtype``."""
        return self.other_elements * _bytes(dtype)

    def total_bytes(self, dtype: torch.dtype) -> int:
        return (self.layer_elements + self.other_elements) * _bytes(dtype)


def _bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def read_facts(path: Path) -> ModelFacts:
    """The facts of the safetensors model directory ``path``; a clear error for a model
    specchat cannot run or files it cannot read."""
    config = check_architecture(path)
    layer_elements = other_elements = 0
    dtypes, shapes, embed_dtype = set(), [], None
    first = f"{LAYER_PREFIX}0."
    for header in safetensors_headers(path):
        for name, info in header.items():
            elements = (info["data_offsets"][1] - info["data_offsets"][0]) // _WIDTHS.get(info["dtype"], 2)
            dtypes.add(info["dtype"])
            if name.startswith(LAYER_PREFIX):
                layer_elements += elements
                if name.startswith(first):
                    shapes.append((name[len(first):], tuple(info["shape"])))
            else:
                other_elements += elements
                if name == EMBED:
                    embed_dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
    return ModelFacts(
        path=path,
        config=config,
        num_layers=int(config.num_hidden_layers),
        layer_shapes=tuple(sorted(shapes)),
        layer_elements=layer_elements,
        other_elements=other_elements,
        dtypes=frozenset(dtypes),
        embed_dtype=embed_dtype,
    )


def safetensors_headers(model_dir: Path) -> list[dict]:
    """The JSON header of each safetensors file: tensor name -> dtype, shape, offsets."""
    headers = []
    for file in sorted(model_dir.glob("*.safetensors")):
        try:
            with open(file, "rb") as handle:
                (header_len,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(header_len))
            header.pop("__metadata__", None)
        except (struct.error, ValueError, AttributeError, OSError, MemoryError, OverflowError) as exc:
            raise CorruptModel(f"{file} is not a readable safetensors file ({exc})", "re-download or re-convert the model") from exc
        headers.append(header)
    return headers


def quiet_transformers() -> None:
    """Our own progress lines go to stderr; transformers' bars would only add noise."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def check_architecture(path: Path):
    """The model's config, if specchat can run its architecture; a clear error otherwise."""
    from transformers import AutoConfig

    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # a damaged or foreign config.json
        raise CorruptModel(f"cannot read {path / 'config.json'}: {exc}", "re-download the model") from exc
    if config.model_type not in SUPPORTED_ARCHITECTURES:
        raise CorruptModel(
            f"architecture {config.model_type!r} is not supported",
            f"specchat runs {', '.join(SUPPORTED_ARCHITECTURES)} models",
        )
    return config
