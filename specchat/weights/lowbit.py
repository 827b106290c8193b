"""Low-bit copies of a decoder layer's linear layers, for a draft made from the target itself.

Both kinds are weight-only (the activations stay in the compute dtype, so the only error is
the weights' rounding) and run on torch's own CPU kernels:

``int8``  symmetric, one scale per output row: W = s q, q in -127..127, s = max|W_row| / 127;
          ``torch._weight_int8pack_mm``.
``int4``  asymmetric, one (scale, min) per group of :data:`INT4_GROUP` input columns:
          w = min + q * scale, q in 0..15; ``torch._weight_int4pack_mm_for_cpu``, which reads
          w = (q - 8) * scale + zero, so zero = min + 8 * scale.

Why these (2-core Xeon with AMX, demo target in bf16, benchmarks/self_draft.py and
benchmarks/lowbit_kernels.py): rounding only the weights keeps the draft's favourite equal to
the target's at most positions, where torch.ao's dynamic int8 (which also rounds every
activation row, per tensor) fell to 0.74.  The weight-only kernels are matrix-vector loops:
8960x1536 at 1 row takes 0.49 ms (int8) and 0.37 ms (int4) against 1.00 ms in bf16, at 8 rows
1.48 and 1.41 against 1.02, so a self draft pays with narrow draft steps.  torchao 0.18 was
tried first: its int8 weight-only layer ran 2-13x slower than bf16 here and it no longer has a
CPU int4 packing, so these call torch's kernels directly.
"""

from __future__ import annotations

import torch
from torch import nn

LOWBIT_KINDS = ("int8", "int4")
LOWBIT_BITS = {"int8": 8, "int4": 4}
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


class Int8Linear(nn.Module):
    """y = x W^T + b with W held as int8 rows and one scale per row (see the module docstring)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()  # (out, in)
        scale = (weight.abs().amax(1) / 127).clamp(min=1e-12)  # (out,)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight_int8 = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
        self.scales = scale
        self.bias = None if linear.bias is None else linear.bias.detach().clone()
        self._dtype = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (N, in)
        if self._dtype != rows.dtype:  # the scales in the activations' dtype, converted once
            self.scales, self._dtype = self.scales.to(rows.dtype), rows.dtype
        out = torch._weight_int8pack_mm(rows, self.weight_int8, self.scales)  # (N, out)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def nbytes(self) -> int:
        return self.weight_int8.nbytes + self.scales.nbytes + (self.bias.nbytes if self.bias is not None else 0)


_LINEARS = {"int8": Int8Linear, "int4": Int4Linear}


def quantize_layer(layer: nn.Module, kind: str) -> nn.Module:
    """``layer`` (in place) with every ``nn.Linear`` replaced by its low-bit ``kind``."""
    if kind not in _LINEARS:
        raise ValueError(f"low-bit kind must be one of {', '.join(LOWBIT_KINDS)}, got {kind!r}")
    for parent in list(layer.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, _LINEARS[kind](child))
    return layer


def layer_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """What the hidden states are in inside a low-bit layer: the target's compute dtype (float32
    for a float64 target: the kernels take 16 or 32 bits)."""
    return torch.float32 if compute_dtype == torch.float64 else compute_dtype


def lowbit_bytes(layer: nn.Module) -> int:
    """Bytes a quantised layer holds: packed weights, scales, norms and biases."""
    total = sum(m.nbytes() for m in layer.modules() if isinstance(m, (Int4Linear, Int8Linear)))
    return total + sum(p.nbytes for p in layer.parameters())
