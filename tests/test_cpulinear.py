"""The weight-left CPU linear computes what nn.Linear computes."""

import pytest
import torch
from torch import nn

from specchat.model.cpulinear import WeightLeftLinear, use_weight_left_linears


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 24), (1, 7, 24), (2, 3, 24), (1, 1, 24)])
def test_weight_left_linear_equals_linear(dtype, atol, bias, shape):
    torch.manual_seed(0)
    plain = nn.Linear(24, 40, bias=bias, dtype=dtype)
    fast = use_weight_left_linears(nn.Sequential(nn.Linear(24, 40, bias=bias, dtype=dtype)))[0]
    fast.load_state_dict(plain.state_dict())
    assert type(fast) is WeightLeftLinear
    x = torch.randn(shape, dtype=dtype)
    out = fast(x)
    assert out.shape == (*shape[:-1], 40) and out.is_contiguous()
    assert torch.allclose(out, plain(x), atol=atol)


@pytest.mark.parametrize("rows", [1, 2, 5, 128, 129, 300])  # one row doubled; above 128 rows the standard layout
def test_bf16_weight_left_linear_equals_the_float32_product_to_bf16_rounding(rows):
    torch.manual_seed(0)
    plain = nn.Linear(64, 96, bias=True)
    fast = use_weight_left_linears(nn.Sequential(nn.Linear(64, 96, bias=True)))[0]
    fast.load_state_dict(plain.state_dict())
    fast.to(torch.bfloat16)
    x = torch.randn(rows, 64)
    out = fast(x.to(torch.bfloat16))
    assert out.shape == (rows, 96) and out.dtype == torch.bfloat16 and out.is_contiguous()
    exact = nn.functional.linear(x.to(torch.bfloat16).double(), fast.weight.double(), fast.bias.double())  # the bf16 inputs' product
    assert torch.allclose(out.double(), exact, rtol=2**-7, atol=2**-6)
    assert torch.equal(fast(x[:1].to(torch.bfloat16)), out[:1]) or rows > 128  # a lone row gives what it gives in a batch


def test_only_plain_linears_are_switched():
    class Other(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(4, 4), Other(4, 4), nn.LayerNorm(4))
    use_weight_left_linears(model)
    assert [type(m).__name__ for m in model] == ["WeightLeftLinear", "Other", "LayerNorm"]


def test_resident_models_use_it_and_the_int8_draft_still_quantizes(tiny_dirs):
    from specchat.model.loading import load_resident, quantize_int8

    lm = load_resident(tiny_dirs["draft"], torch.float32).lm
    kinds = {type(m).__name__ for layer in lm.layer_source.layers() for m in layer.modules()}
    assert "WeightLeftLinear" in kinds and "Linear" not in kinds
    quantize_int8(lm)
    kinds = {type(m).__module__ + "." + type(m).__name__ for layer in lm.layer_source.layers() for m in layer.modules()}
    assert not any(k.endswith("WeightLeftLinear") or k == "torch.nn.modules.linear.Linear" for k in kinds)
    assert any("quantized" in k for k in kinds)
