"""Draft forward time, float32 vs dynamic int8, against the number of nodes per draft step (demo draft).

    .venv/bin/python benchmarks/draft_int8.py
"""

import time

import torch

from specchat.model.lm import causal_visibility
from specchat.model.loading import load_resident, quantize_int8
from specchat.sources.resolve import materialize, parse_model_spec
from specchat.sources.registry import load_registry


def step_time(lm, batch: int, repeats: int = 5) -> float:
    prefix = torch.randint(0, 1000, (64,))
    cache = lm.new_cache()
    lm.forward(prefix, torch.arange(64), causal_visibility(0, 64), cache)
    nodes = torch.randint(0, 1000, (batch,))
    start = time.perf_counter()
    for _ in range(repeats):
        cache.crop(64)
        lm.forward(nodes, torch.arange(64, 64 + batch), causal_visibility(64, batch), cache)
    return (time.perf_counter() - start) / repeats


path = materialize(parse_model_spec("demo-0.5b", load_registry()))
fp32 = load_resident(path).lm
rows = {batch: step_time(fp32, batch) for batch in (1, 8, 32)}
int8 = quantize_int8(load_resident(path).lm)
for batch, seconds in rows.items():
    quantised = step_time(int8, batch)
    print(f"batch {batch:3d}: fp32 {seconds:.3f} s, int8 {quantised:.3f} s, {seconds / quantised:.1f}x")
