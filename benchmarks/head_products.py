"""One LM-head product of the demo target's shape (151,936 x 1,536) at 1-128 rows, per weight
format: float32 (what the target holds on a float32 CPU), float16 / bfloat16 weights with rows
of their dtype, float16 weights up-cast to float32 in chunks of 4,096 rows, and torch's int8
(per row) and int4 (per group of 32, bf16 rows) kernels.  Median of 7, ms.

    .venv/bin/python benchmarks/head_products.py
"""

import torch
from lowbit_kernel_dtypes import milliseconds
from torch import nn

from specchat.weights.lowbit import Int4Linear, Int8Linear

VOCAB, HIDDEN = 151_936, 1_536


def upcast_in_chunks(rows: torch.Tensor, weight: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    out = torch.empty(rows.shape[0], weight.shape[0])
    for start in range(0, weight.shape[0], chunk):
        out[:, start:start + chunk] = rows @ weight[start:start + chunk].float().T
    return out


def main() -> None:
    torch.manual_seed(0)
    head = nn.Linear(HIDDEN, VOCAB, bias=False)
    head.weight.data.normal_(0, 0.02)
    weight = head.weight.data
    half, brain = weight.half(), weight.bfloat16()
    int8, int4 = Int8Linear.quantize(head), Int4Linear.quantize(head)
    print("rows  float32  float16  bfloat16  float16->float32 chunks  int8  int4")
    for n in (1, 8, 32, 128):
        x = torch.randn(n, HIDDEN)
        cells = [
            milliseconds(lambda: x @ weight.T), milliseconds(lambda: x.half() @ half.T), milliseconds(lambda: x.bfloat16() @ brain.T),
            milliseconds(lambda: upcast_in_chunks(x, half)), milliseconds(lambda: int8.product(x)), milliseconds(lambda: int4.product(x)),
        ]
        print(f"{n:4}  " + "  ".join(f"{c:7.1f}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
