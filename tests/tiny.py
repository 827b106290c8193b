"""Tiny random-init decoder models and a stand-in tokenizer, built in milliseconds."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from specchat.model.lm import LayeredLM

VOCAB = 64


def tiny_hf(seed: int = 0, arch: str = "llama", vocab: int = VOCAB, layers: int = 2, dtype=torch.float64):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    config = Qwen2Config(**common) if arch == "qwen2" else LlamaConfig(**common)
    config._attn_implementation = "sdpa"
    model = (Qwen2ForCausalLM if arch == "qwen2" else LlamaForCausalLM)(config).to(dtype).eval()
    # Sharper distributions than the default init, so greedy paths are not all ties
    # and a draft equal to the target is confident.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def tiny_lm(seed: int = 0, **kwargs) -> LayeredLM:
    return LayeredLM(tiny_hf(seed, **kwargs))


class CharTokenizer:
    """Token i decodes to one printable character; 0 is EOS."""

    eos_token_id = 0

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(0x41 + (i % 58)) for i in ids if not (skip_special_tokens and i == 0))


class TickingClock:
    """An engine clock on which every timed span lasts 0.1 s: SpecExec's adaptive stop then
    decides the same on any machine, under any load."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.1
        return self.now
