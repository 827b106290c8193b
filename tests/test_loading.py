"""Loading the int8 draft from its 16-bit checkpoint without a float32 copy of the whole model."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from conftest import tiny_tokenizer
from specchat.model.lm import UpcastEmbedding, causal_visibility
from specchat.model.loading import load_int8, load_resident, quantize_int8


def save_checkpoint(directory, dtype: torch.dtype, tied: bool):
    torch.manual_seed(3)
    config = Qwen2Config(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied,
    )
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():  # non-trivial norms too, so a skipped conversion shows
            param.add_(torch.randn_like(param) * 0.05)
    model.to(dtype).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def logits(lm, ids: torch.Tensor) -> torch.Tensor:
    return lm.forward(ids, torch.arange(len(ids)), causal_visibility(0, len(ids)), lm.new_cache())  # (T, vocab)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tied", [False, True])
def test_int8_load_equals_float32_load_then_quantize(tmp_path, dtype, tied):
    path = save_checkpoint(tmp_path / "model", dtype, tied)
    ids = torch.tensor([5, 9, 2, 40, 17, 33, 8, 1])
    reference = quantize_int8(load_resident(path, torch.float32).lm)
    lm = load_int8(path).lm
    assert torch.equal(logits(lm, ids), logits(reference, ids))
    assert lm.dtype == torch.float32 and lm.norm.weight.dtype == torch.float32


@pytest.mark.parametrize("tied", [False, True])
def test_int8_load_keeps_the_table_16bit_and_no_float_linear(tmp_path, tied):
    lm = load_int8(save_checkpoint(tmp_path / "model", torch.bfloat16, tied)).lm
    assert isinstance(lm.embed_tokens, UpcastEmbedding) and lm.embed_tokens.weight.dtype == torch.bfloat16
    kinds = {type(m).__module__ for layer in lm.layer_source.layers() for m in layer.modules()} | {type(lm.lm_head).__module__}
    assert "torch.nn.modules.linear" not in kinds and any("quantized" in k for k in kinds)
    floats = [n for layer in lm.layer_source.layers() for n, p in layer.named_parameters() if p.dtype != torch.float32]
    assert floats == []  # norms up-cast with their layer
