"""From a :class:`RunConfig` to a ready :class:`Engine`: resolve, pre-flight, load, pair, template."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from .config import RunConfig
from .engine import Engine
from .errors import InputError, ModelNotFound, ResourceError, SpecchatError
from .loading import LoadedModel, check_same_tokenizer, load_resident
from .registry import ModelEntry, load_registry
from .sources import ModelRef, Progress, materialize, parse_model_spec

COMPUTE_DTYPE = torch.float32  # bf16 matmuls are ~100x slower than fp32 on CPUs without AMX/bf16 units
RAM_HEADROOM = 1.1  # activations, KV cache and allocator slack over the raw weights


@dataclass
class Pipeline:
    engine: Engine
    target: LoadedModel
    draft: LoadedModel | None
    target_name: str
    draft_name: str | None
    draft_reason: str

    @property
    def tokenizer(self):
        return self.target.tokenizer

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` through the model's chat template, ready for the reply."""
        return encode_chat(self.tokenizer, messages)


def encode_chat(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:  # a base model: plain concatenation
        text = "\n\n".join(m["content"] for m in messages)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def resident_bytes(model_dir: Path, dtype: torch.dtype = COMPUTE_DTYPE) -> int:
    """Bytes the weights take once loaded in ``dtype``, from the safetensors headers."""
    total = 0
    widths = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1}
    for file in model_dir.glob("*.safetensors"):
        with open(file, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_len))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            total += (end - start) // widths.get(info["dtype"], 2)
    return total * torch.finfo(dtype).bits // 8


def _preflight(target_dir: Path, draft_dir: Path | None) -> None:
    needed = resident_bytes(target_dir) + (resident_bytes(draft_dir) if draft_dir else 0)
    available = psutil.virtual_memory().available
    if needed * RAM_HEADROOM > available:
        raise ResourceError(
            f"not enough RAM to hold the models: {needed * RAM_HEADROOM / 1e9:.1f} GB needed, "
            f"{available / 1e9:.1f} GB available",
            "close other programs or choose a smaller model (see `specchat models`)",
        )


def _choose_draft(
    config: RunConfig, target_ref: ModelRef, registry: dict[str, ModelEntry], progress: Progress
) -> tuple[ModelRef | None, Path | None, str]:
    """(draft ref, its directory, one-line reason)."""
    if config.method == "ar" or config.draft == "none":
        return None, None, "no draft: plain autoregressive decoding"
    if config.draft != "auto":
        ref = parse_model_spec(config.draft, registry)
        return ref, materialize(ref, progress), f"draft {ref.display}: chosen with --draft"
    candidates = list(target_ref.entry.drafts) if target_ref.entry else []
    if not candidates:
        raise InputError(
            f"no registered draft pairs with {target_ref.display}",
            "name one with --draft, or use --draft none for plain decoding",
        )
    skipped = []
    for name in candidates:
        ref = parse_model_spec(name, registry)
        try:
            return ref, materialize(ref, progress), f"draft {name}: the first registered draft of {target_ref.display} present here"
        except ModelNotFound as exc:
            skipped.append(f"{name} ({exc.what})")
    raise ModelNotFound(
        f"none of the drafts of {target_ref.display} is available: {'; '.join(skipped)}",
        f"run `specchat setup {target_ref.spec}`, or use --draft none",
    )


def load_pipeline(config: RunConfig, progress: Progress) -> Pipeline:
    registry = load_registry()
    target_ref = parse_model_spec(config.model, registry)
    target_dir = materialize(target_ref, progress)
    draft_ref, draft_dir, reason = _choose_draft(config, target_ref, registry, progress)
    _preflight(target_dir, draft_dir)
    progress(f"loading {target_ref.display}")
    target = load_resident(target_dir, COMPUTE_DTYPE)
    draft = None
    if draft_dir is not None:
        progress(f"loading {draft_ref.display}")
        draft = load_resident(draft_dir, COMPUTE_DTYPE)
        check_same_tokenizer(target.tokenizer, draft.tokenizer, draft_ref.display)
    engine = Engine(target.lm, draft.lm if draft else None, target.tokenizer, target.eos_token_ids)
    return Pipeline(
        engine, target, draft, target_ref.display, draft_ref.display if draft_ref else None, reason
    )


__all__ = ["Pipeline", "load_pipeline", "encode_chat", "SpecchatError"]
