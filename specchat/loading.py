"""Loading a materialised model directory into a :class:`LayeredLM`, and pairing a draft."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .cpulinear import WeightLeftLinear, use_weight_left_linears
from .errors import CorruptModel, InputError
from .lm import LayeredLM, ResidentLayers, keep_embedding_16bit

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral", "mixtral", "qwen3")


@dataclass
class LoadedModel:
    lm: LayeredLM
    tokenizer: object
    path: Path

    @property
    def eos_token_ids(self) -> list[int]:
        """End-of-turn ids: the generation config's (often several) plus the tokenizer's."""
        from transformers import GenerationConfig

        try:
            eos = GenerationConfig.from_pretrained(self.path).eos_token_id
        except OSError:  # no generation_config.json
            eos = None
        ids = {eos} if isinstance(eos, int) else set(eos or [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)


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


GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: Path):
    """The tokenizer the model ships.  A generic fast tokenizer is loaded as such: AutoTokenizer
    would otherwise pick the class of the model type and replace its decoder."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        declared = json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        declared = None
    loader = PreTrainedTokenizerFast if declared in GENERIC_TOKENIZER_CLASSES else AutoTokenizer
    try:
        return loader.from_pretrained(path)
    except Exception as exc:  # transformers raises many types for a broken tokenizer
        raise CorruptModel(f"cannot load the tokenizer in {path}: {exc}", "re-download or re-convert the model") from exc


def load_resident(path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
    """The whole model on ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM

    check_architecture(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    except Exception as exc:  # safetensors/transformers raise many types for a damaged file
        raise CorruptModel(f"cannot load the weights in {path}: {exc}", "delete and re-create the model files") from exc
    model.to(device).eval()
    keep_embedding_16bit(model, checkpoint_dtype(path, "model.embed_tokens.weight"))
    use_weight_left_linears(model)
    return LoadedModel(LayeredLM(model), load_tokenizer(path), path)


_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def checkpoint_dtype(path: Path, name: str) -> torch.dtype | None:
    """The dtype tensor ``name`` has in the model's safetensors files (None if not found)."""
    from safetensors import safe_open

    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            if name in handle.keys():
                return _SAFETENSORS_DTYPES.get(handle.get_slice(name).get_dtype())
    return None


def quantize_int8(lm: LayeredLM) -> LayeredLM:
    """Dynamic int8 weights for every Linear of a resident model (CPU; 2.3-4.4x faster draft steps, benchmarks/draft_int8.py).

    Used for the draft only: the draft merely proposes, so its precision changes
    how many tokens are accepted, never what the target outputs.
    """
    import warnings

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layers = nn.ModuleList(lm.layer_source.layers())
        for module in [*layers.modules(), lm.lm_head]:  # back to plain Linear, which quantize_dynamic maps
            if isinstance(module, WeightLeftLinear):
                module.__class__ = nn.Linear
        quantize_dynamic(layers, {nn.Linear}, dtype=torch.qint8, inplace=True)
        head = quantize_dynamic(nn.Sequential(lm.lm_head), {nn.Linear}, dtype=torch.qint8)
    lm.layer_source = ResidentLayers(layers)
    lm.lm_head = head[0]
    return lm


def check_same_tokenizer(target_tokenizer, draft_tokenizer, draft_name: str) -> None:
    """Refuse a draft whose vocabulary or special tokens differ from the target's."""
    target_vocab, draft_vocab = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    if target_vocab != draft_vocab:
        for token, index in sorted(target_vocab.items(), key=lambda item: item[1]):
            if draft_vocab.get(token) != index:
                raise InputError(
                    f"draft {draft_name} does not share the target's tokenizer: token {token!r} is id {index} "
                    f"in the target and {draft_vocab.get(token)} in the draft",
                    "pick a draft of the same model family (see `specchat models`)",
                )
        extra = sorted(set(draft_vocab) - set(target_vocab))
        raise InputError(
            f"draft {draft_name} does not share the target's tokenizer: the draft has extra token {extra[0]!r}",
            "pick a draft of the same model family (see `specchat models`)",
        )
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if getattr(target_tokenizer, attr, None) != getattr(draft_tokenizer, attr, None):
            raise InputError(
                f"draft {draft_name} has a different {attr} ({getattr(draft_tokenizer, attr, None)!r} vs "
                f"{getattr(target_tokenizer, attr, None)!r})",
                "pick a draft of the same model family (see `specchat models`)",
            )
