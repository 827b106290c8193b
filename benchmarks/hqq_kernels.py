"""Could HQQ's 2-4 bit layers make a cheaper self draft on a CPU than torch's int4 kernel?

Milliseconds per product of the demo target's MLP shapes at 1 and 8 rows (a draft step's
widths), and each rounding's relative weight error ||W - W_q|| / ||W|| over the same random
weight: bf16, specchat's int8 and int4 (torch's weight-only kernels), and HQQ (``hqq``, not a
specchat dependency: ``pip install hqq``) at 4, 3 and 2 bits, groups of 64, on its CPU backend
(which dequantises the whole weight to bf16 in every forward, then multiplies).

    .venv/bin/python benchmarks/hqq_kernels.py
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from lowbit_kernels import milliseconds  # this folder's kernel timer (run as a script from here)
from specchat.weights.lowbit import Int4Linear, Int8Linear

ROWS = (1, 8)


def relative_error(weight: torch.Tensor, rounded: torch.Tensor) -> float:
    return float((weight - rounded.float()).norm() / weight.norm())


def unit_columns(module: nn.Module, in_features: int) -> torch.Tensor:
    """The weight a linear module computes with, read back as its products of the identity: (out, in)."""
    return module(torch.eye(in_features, dtype=torch.bfloat16)).float().t()


def main() -> None:
    from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    HQQLinear.set_backend(HQQBackend.PYTORCH)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("matrix     kind        err    ms@" + "  ms@".join(str(r) for r in ROWS))
    for out_features, in_features in ((8960, 1536), (1536, 8960)):
        linear = nn.Linear(in_features, out_features, bias=False)
        weight = linear.weight.detach().clone()
        kinds: dict[str, nn.Module] = {
            "bf16": copy.deepcopy(linear).to(torch.bfloat16),
            "int8": Int8Linear.quantize(copy.deepcopy(linear).to(torch.bfloat16)),
            "int4": Int4Linear.quantize(copy.deepcopy(linear).to(torch.bfloat16)),
        }
        for bits in (4, 3, 2):
            config = BaseQuantizeConfig(nbits=bits, group_size=64)
            kinds[f"hqq{bits}"] = HQQLinear(copy.deepcopy(linear).to(torch.bfloat16), config,
                                            compute_dtype=torch.bfloat16, device="cpu")
        with torch.no_grad():
            for kind, module in kinds.items():
                error = relative_error(weight, unit_columns(module, in_features))
                times = [milliseconds(module, torch.randn(rows, in_features, dtype=torch.bfloat16), repeats=20) for rows in ROWS]
                print(f"{out_features}x{in_features} {kind:6} {error:8.4f} " + " ".join(f"{t:7.2f}" for t in times), flush=True)


if __name__ == "__main__":
    main()
