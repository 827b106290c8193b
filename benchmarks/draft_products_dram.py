"""A self-draft step's int8 products read from DRAM, the demo target's shapes: 28 layers x 7
separate weights (q, k, v, o, gate, up, down) against 4 fused ones (qkv, o, gate+up, down), each
weight read once per step as in a draft's forward (1.3 GB, far beyond the caches); then the LM
head in bf16 and in int8, and a plain bf16 reduction over 1 GiB for the DRAM bandwidth.

    .venv/bin/python benchmarks/draft_products_dram.py
"""

import time

import torch

LAYERS, HIDDEN, KV, FFN, VOCAB = 28, 1536, 256, 8960, 151936


def int8_weight(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(-128, 127, (rows, cols), dtype=torch.int8), torch.rand(rows, dtype=torch.bfloat16)


def ms_per_call(fn, n: int = 10) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - started) / n * 1e3


def main() -> None:
    torch.manual_seed(0)
    separate = [[int8_weight(*shape) for shape in ((HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN),
                                                   (FFN, HIDDEN), (FFN, HIDDEN), (HIDDEN, FFN))] for _ in range(LAYERS)]
    fused = [[int8_weight(*shape) for shape in ((HIDDEN + 2 * KV, HIDDEN), (HIDDEN, HIDDEN), (2 * FFN, HIDDEN),
                                                (HIDDEN, FFN))] for _ in range(LAYERS)]
    x_hidden, x_ffn = torch.randn(1, HIDDEN, dtype=torch.bfloat16), torch.randn(1, FFN, dtype=torch.bfloat16)

    def step(layers):
        for weights in layers:
            for w, scale in weights:
                torch._weight_int8pack_mm(x_ffn if w.shape[1] == FFN else x_hidden, w, scale)

    nbytes = sum(w.numel() for weights in separate for w, _ in weights)
    for name, layers in (("separate", separate), ("fused", fused)):
        ms = ms_per_call(lambda: step(layers))
        print(f"int8 products, {name}: {ms:.1f} ms per step, {nbytes / ms / 1e6:.1f} GB/s")
    head = torch.randn(VOCAB, HIDDEN, dtype=torch.bfloat16)
    ms = ms_per_call(lambda: torch.nn.functional.linear(x_hidden, head))
    print(f"bf16 head: {ms:.1f} ms, {head.numel() * 2 / ms / 1e6:.1f} GB/s")
    head8, scale8 = int8_weight(VOCAB, HIDDEN)
    ms = ms_per_call(lambda: torch._weight_int8pack_mm(x_hidden, head8, scale8))
    print(f"int8 head: {ms:.1f} ms, {head8.numel() / ms / 1e6:.1f} GB/s")
    big = torch.ones(1 << 29, dtype=torch.bfloat16)
    ms = ms_per_call(lambda: big.sum(), 3)
    print(f"bf16 sum over 1 GiB: {ms:.1f} ms, {(1 << 30) / ms / 1e6:.1f} GB/s")


if __name__ == "__main__":
    main()
