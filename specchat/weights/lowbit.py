"""Low-bit copies of a decoder layer's linear layers, for a draft made from the target itself.

Two kinds, each over a maintained CPU kernel:

``int8``  dynamic int8 (torch.ao ``quantize_dynamic`` with per-output-channel weight scales, the
          fbgemm/x86 int8 GEMM): each product quantises its input rows on the fly.  y = (s_x x_q)
          (s_w W_q)^T, s_w one scale per output row.  Inputs and outputs are float32.
``int4``  weight-only int4, asymmetric, one (scale, min) per group of :data:`INT4_GROUP` input
          columns, over torch's ``_weight_int4pack_mm_for_cpu``; inputs stay 16- or 32-bit.
          w = min + q * scale, q in 0..15; the kernel reads w = (q - 8) * scale + zero, so
          zero = min + 8 * scale.

Products of the demo target's MLP shapes (8960x1536, ms per call, 2-core Xeon with AMX,
benchmarks/lowbit_kernels.py): at 8 rows bf16 1.02, int8 dynamic 0.42, int4 1.41; at 1 row
bf16 1.00, int8 0.32, int4 0.37.  The int4 kernel's time grows with the rows (it is a loop of
matrix-vector products), so int4 pays only for one- or two-row draft steps on such a CPU.
torchao 0.18 was tried first: its int8 weight-only layer ran 2-13x slower than bf16 here and
it has no CPU int4 packing any more, so the two kinds call torch's kernels directly.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

LOWBIT_KINDS = ("int8", "int4")
INT4_GROUP = 64  # input columns per (scale, min); a smaller power of two for narrow layers


class Int4Linear(nn.Module):
    """y = x W^T + b with W held as packed int4 groups (see the module docstring)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()  # (out, in)
        out_features, in_features = weight.shape
        group = int4_group(in_features)
        grouped = weight.reshape(out_features, in_features // group, group)  # (out, in/g, g)
        low, high = grouped.amin(-1), grouped.amax(-1)  # (out, in/g)
        scale = ((high - low) / 15).clamp(min=1e-12)
        q = torch.round((grouped - low[..., None]) / scale[..., None]).clamp(0, 15)
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.packed = torch._convert_weight_to_int4pack_for_cpu(q.reshape(out_features, in_features).to(torch.int32), 1)
        # (in/g, out, 2): per group and output row, (scale, zero)
        self.scales_zeros = torch.stack([scale, low + 8 * scale], -1).transpose(0, 1).contiguous()
        self.bias = None if linear.bias is None else linear.bias.detach().clone()
        self._dtype = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (N, in)
        if self._dtype != rows.dtype:  # the scales in the activations' dtype, converted once
            self.scales_zeros, self._dtype = self.scales_zeros.to(rows.dtype), rows.dtype
        out = torch._weight_int4pack_mm_for_cpu(rows, self.packed, self.group, self.scales_zeros)  # (N, out)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_zeros.nbytes + (self.bias.nbytes if self.bias is not None else 0)


def int4_group(in_features: int) -> int:
    """The largest supported group size (32..:data:`INT4_GROUP`) that divides ``in_features``."""
    for group in (INT4_GROUP, 32):
        if in_features % group == 0:
            return group
    raise ValueError(f"int4 needs layers whose input width is a multiple of 32, got {in_features}")


def quantize_layer(layer: nn.Module, kind: str) -> nn.Module:
    """``layer`` (in place) with every ``nn.Linear`` in the low-bit ``kind``; int8 leaves the rest
    of the layer (norms) in float32, the dtype its products take and give."""
    if kind == "int8":
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        layer.float()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notice
            return quantize_dynamic(layer, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    if kind == "int4":
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int4Linear(child))
        return layer
    raise ValueError(f"low-bit kind must be one of {', '.join(LOWBIT_KINDS)}, got {kind!r}")


def layer_dtype(kind: str, compute_dtype: torch.dtype) -> torch.dtype:
    """What the hidden states are in, inside a low-bit layer: float32 for int8's dynamic products;
    the target's compute dtype for int4 (float32 for a float64 target: the kernel takes 16/32 bits)."""
    if kind == "int8" or compute_dtype == torch.float64:
        return torch.float32
    return compute_dtype


def lowbit_bytes(layer: nn.Module) -> int:
    """Bytes a quantised layer holds: packed weights, scales, norms and biases."""
    total = 0
    for module in layer.modules():
        if isinstance(module, Int4Linear):
            total += module.nbytes()
        elif isinstance(module, DynamicInt8Linear):  # int8 weights, a scale and a zero point per row
            weight, bias = module.weight(), module.bias()
            total += weight.int_repr().nbytes + weight.q_per_channel_scales().nbytes * 2
            total += bias.nbytes if bias is not None else 0
    total += sum(p.nbytes for p in layer.parameters())
    return total
