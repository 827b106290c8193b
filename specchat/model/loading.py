"""Loading a materialised model directory into a :class:`LayeredLM`, and pairing a draft."""

from __future__ import annotations

import gc
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from specchat.model.cpulinear import WeightLeftLinear, use_weight_left_linears
from specchat.common.errors import CorruptModel, InputError
from specchat.model.lm import LayeredLM, ResidentLayers, UpcastEmbedding, keep_embedding_16bit
from specchat.sources.facts import ModelFacts, read_facts



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


def _from_pretrained(path: Path, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    except Exception as exc:  # safetensors/transformers raise many types for a damaged file
        raise CorruptModel(f"cannot load the weights in {path}: {exc}", "delete and re-create the model files") from exc
    return model.eval()


def load_resident(
    path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu", facts: ModelFacts | None = None
) -> LoadedModel:
    """The whole model on ``device`` in ``dtype`` (``facts``: the model's, if already read)."""
    facts = facts or read_facts(path)  # refuses an architecture specchat cannot run
    model = _from_pretrained(path, dtype)
    model.to(device)
    keep_embedding_16bit(model, facts.embed_dtype)
    use_weight_left_linears(model)
    return LoadedModel(LayeredLM(model), load_tokenizer(path), path)


def quantize_int8(lm: LayeredLM) -> LayeredLM:
    """Dynamic int8 weights for every Linear of a resident model (CPU; 2.3-4.4x faster draft steps, benchmarks/draft_int8.py).

    Used for the draft only: the draft merely proposes, so its precision changes
    how many tokens are accepted, never what the target outputs.
    """
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layers = nn.ModuleList(lm.layer_source.layers())
        for module in [*layers.modules(), lm.lm_head]:  # back to plain Linear, which quantize_dynamic maps
            if isinstance(module, WeightLeftLinear):
                module.__class__ = nn.Linear
        quantize_dynamic(layers, {nn.Linear}, dtype=torch.qint8, inplace=True)
        lm.lm_head = _int8_copy(lm.lm_head)  # a copy: a tied head leaves the embedding table as it is
    lm.layer_source = ResidentLayers(layers)
    return lm


def load_int8(path: Path, facts: ModelFacts | None = None) -> LoadedModel:
    """The model on the CPU with every Linear in dynamic int8 (as :func:`quantize_int8` makes it), built
    without a float32 copy of the whole model.

    The weights load in the checkpoint's 16 bits; then the head and one decoder layer at a time go
    to float32 (exact from 16 bits) and are quantised, so the float32 transient is one matrix or
    layer. The embedding table stays 16-bit (:class:`UpcastEmbedding`), norms go to float32. Same
    numbers as loading in float32 and calling :func:`quantize_int8` (tests/test_loading.py), at
    about half the peak RAM (benchmarks/draft_load_peak.py).
    """
    from torch.ao.quantization import quantize_dynamic

    stored = (facts or read_facts(path)).embed_dtype
    model = _from_pretrained(path, stored if stored in (torch.float16, torch.bfloat16) else torch.float32)
    base = model.model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        model.lm_head = _int8_copy(model.lm_head)  # a tied head's table stays the (16-bit) embedding
        gc.collect()
        if base.embed_tokens.weight.dtype != torch.float32:
            base.embed_tokens = UpcastEmbedding(base.embed_tokens.weight.detach().clone(), torch.float32)
        for layer in base.layers:
            layer.float()
            quantize_dynamic(layer, {nn.Linear}, dtype=torch.qint8, inplace=True)
            gc.collect()  # the replaced float32 Linears sit in reference cycles: free them now, not at the end
    base.norm.float()
    base.rotary_emb.float()
    return LoadedModel(LayeredLM(model), load_tokenizer(path), path)


def _int8_copy(linear: nn.Linear) -> nn.Module:
    """A dynamic-int8 Linear with ``linear``'s weights, made from a float32 copy of them."""
    from torch.ao.quantization import quantize_dynamic

    with torch.device("meta"):  # no float32 initialisation of a matrix about to be replaced
        plain = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    plain.weight = nn.Parameter(linear.weight.detach().float(), requires_grad=False)  # (out, in)
    if linear.bias is not None:
        plain.bias = nn.Parameter(linear.bias.detach().float(), requires_grad=False)
    return quantize_dynamic(nn.Sequential(plain), {nn.Linear}, dtype=torch.qint8, inplace=True)[0]


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
