"""A faster CPU product for the narrow inputs speculative decoding feeds its linear layers.

``nn.Linear`` computes y = x W^T with x (N, in) on the left.  For the N of a
draft step or a verification tree (1 to a few hundred rows) the CPU BLAS is often
faster with the weight on the left: y^T = W x^T, (out, in) @ (in, N).  Same maths,
same weights; only the order of the floating-point sums differs.

float32 on a CPU with AVX2 only (2 AMD EPYC cores, ms, standard vs.
weight-left, `benchmarks/linear_layout.py`): N=16, 8960x1536: 10.1 vs 6.6; N=64: 17.7 vs
13.5; N=256: 49.2 vs 44.7; N=1024: 186 vs 202 (a small loss).

bfloat16 on a CPU with AMX-BF16 (2 Xeon cores, `benchmarks/cpu_dtype.py`): weight-left
wins from 2 to 128 rows (8960x1536, N=16: 1.09 vs 0.84 ms) and loses above (N=256: 4.84 vs
7.39), so it is used only up to :data:`BF16_WEIGHT_LEFT_MAX_ROWS`.  One row is the slow case
there (a matrix-vector product that the bf16 tile units do not take: 0.98 ms, against
0.68 ms for two), so a single row is computed as two equal rows and one is dropped.
"""

from __future__ import annotations

import torch
from torch import nn

BF16_WEIGHT_LEFT_MAX_ROWS = 128


class WeightLeftLinear(nn.Linear):
    """``nn.Linear`` whose CPU forward multiplies W (out, in) by x^T (in, N)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        rows = x.reshape(-1, x.shape[-1])  # (N, in)
        n = rows.shape[0]
        if self.weight.dtype == torch.bfloat16:
            if n > BF16_WEIGHT_LEFT_MAX_ROWS:
                return super().forward(x)
            if n == 1:
                rows = rows.expand(2, -1)  # (2, in): the same row twice, for the tile units
        if self.bias is None:
            out = torch.mm(self.weight, rows.t())  # (out, N)
        else:
            out = torch.addmm(self.bias[:, None], self.weight, rows.t())  # (out, N)
        return out[:, :n].t().contiguous().view(*x.shape[:-1], self.out_features)  # (..., out)


def use_weight_left_linears(module: nn.Module) -> nn.Module:
    """Switch every plain ``nn.Linear`` inside ``module`` (in place) to :class:`WeightLeftLinear`."""
    for child in module.modules():
        if type(child) is nn.Linear:
            child.__class__ = WeightLeftLinear
    return module
