"""NF4 dequantisation on the CPU, per 8960x1536 matrix (a demo-target MLP weight), ms.

    .venv/bin/python benchmarks/nf4_dequant.py

op16+copy: bitsandbytes' CPU op into a fresh float16 tensor, then copied into a float32
parameter (the streamer before session 5); op32+copy: the same op writing float32;
kernel-into: its kernel writing the float32 parameter in place (specchat.weights.quant4 now).
"""

from __future__ import annotations

import time

import torch

from specchat.weights import quant4


def main() -> None:
    torch.manual_seed(0)
    weight = torch.randn(8960, 1536)
    packed, absmax = quant4.quantize_nf4(weight)
    param = torch.empty(weight.shape)
    shape = tuple(weight.shape)
    functional = quant4._bnb()
    code = functional.get_4bit_type("nf4", device="cpu")

    def op(dtype: torch.dtype) -> torch.Tensor:
        state = functional.QuantState(absmax=absmax, shape=weight.shape, code=code, blocksize=quant4.BLOCK, quant_type="nf4", dtype=dtype)
        return functional.dequantize_4bit(packed.view(-1, 1), state)

    ways = {
        "op16+copy": lambda: param.copy_(op(torch.float16)),
        "op32+copy": lambda: param.copy_(op(torch.float32)),
        "kernel-into": lambda: quant4.dequantize_nf4(packed, absmax, shape, out=param),
    }
    ways["kernel-into"]()
    assert torch.equal(param, op(torch.float32)), "the in-place kernel must give the op's float32 result"
    for threads in (1, 2):
        torch.set_num_threads(threads)
        timings = []
        for name, way in ways.items():
            way()
            start = time.perf_counter()
            for _ in range(20):
                way()
            timings.append(f"{name} {(time.perf_counter() - start) / 20 * 1e3:.1f}")
        print(f"{threads} torch thread(s): " + ", ".join(timings) + " ms")


if __name__ == "__main__":
    main()
