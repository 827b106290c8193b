"""The LM head a self draft computes its logits with: the target's own, or, where the target's
head is float32 and an int8 copy of it is measured faster, that copy for narrow steps.

A draft step's products over its decoder layers are low-bit, but its head is the target's: a
(vocab, hidden) matrix the step reads whole.  Where the target computes in float32 (a CPU
without bf16 matrix instructions) that matrix is 4 bytes a weight -- 0.93 GB for the demo
target -- and on a 2-core AMD EPYC with AVX2 one width-1 product of it took 93 ms of a 273 ms
int4 step, 354 ms of a 750 ms width-8 one; torch's int8 kernel over an int8 copy (one scale per
vocabulary row, 0.23 GB) took 29 and 79 ms (benchmarks/head_products.py; docs/benchmarks.md,
session 34).  The copy changes only the draft's scores (the target verifies with its own
head), and it is kept only where the probe below finds it faster on the machine at hand.

Rows of :class:`~specchat.weights.lowbit.Int8Linear` are rounded to bf16 for the kernel, like
the copy's decoder layers.  The int8 kernel's cost grows with the rows where the float32
product's barely does, so from :attr:`NarrowHead.wide_rows` rows on the target's head is used.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from specchat.weights.lowbit import Int8Linear, median_seconds

PROBE_ROWS = 32_768  # vocabulary rows timed: 0.2 GB of float32, past a 32 MB L3 even as int8
PROBE_WIDTHS = (1, 2, 4, 8, 16, 32, 64)  # draft-step widths tried, narrowest first


class NarrowHead(nn.Module):
    """y = x W^T by an int8 copy of the head W for fewer than ``wide_rows`` rows, by ``head`` itself
    (the target's, shared) from there."""

    def __init__(self, head: nn.Linear, copy: Int8Linear, wide_rows: int) -> None:
        super().__init__()
        self.copy, self.wide_rows = copy, wide_rows
        self.__dict__["head"] = head  # not a submodule: the target's tensors, not this model's own
        self.out_features = head.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., hidden) -> (..., vocab)
        rows = x.numel() // x.shape[-1]
        return self.copy(x) if rows < self.wide_rows else self.head(x)

    def nbytes(self) -> int:
        return self.copy.nbytes()


def copy_bytes(vocab: int, hidden: int, dtype: torch.dtype) -> int:
    """RAM an int8 copy of a (vocab, hidden) head would take beside a target computing in
    ``dtype``: only a float32 head of at least :data:`PROBE_ROWS` rows is ever copied."""
    if dtype != torch.float32 or vocab < PROBE_ROWS:
        return 0
    return vocab * hidden + vocab * 2  # int8 weights and a bf16 scale per row


Seconds = Callable[[nn.Module, torch.Tensor], float]  # (a head, its input rows) -> seconds one product takes


def timed_product(head: nn.Module, rows: torch.Tensor, clock: Callable[[], float] = time.perf_counter) -> float:
    """Median seconds of ``head(rows)`` over 3 runs after a warm-up."""
    return median_seconds(lambda: head(rows), clock, repeats=3)


def draft_head(head: nn.Linear, dtype: torch.dtype, seconds: Seconds = timed_product) -> tuple[nn.Module, str]:
    """The head a self draft of a target computing in ``dtype`` uses, and one line saying which and why.

    For a float32 head of :data:`PROBE_ROWS` rows or more, its first :data:`PROBE_ROWS` rows and
    their int8 copy are timed (``seconds``) at each of :data:`PROBE_WIDTHS` rows of input; the copy
    is made whole and used below the first width at which the float32 product was as fast (never,
    where it was even at one row)."""
    if copy_bytes(head.out_features, head.in_features, dtype) == 0 or head.weight.device.type != "cpu":
        return head, "the target's head"
    part = _first_rows(head, PROBE_ROWS)
    wide, speedup = _crossover(part, Int8Linear.quantize(part), seconds)
    if wide == PROBE_WIDTHS[0]:
        return head, f"the target's head (an int8 copy was no faster here: {speedup:.2f}x at one row)"
    copy = Int8Linear.quantize(head)
    return NarrowHead(head, copy, wide), (
        f"an int8 copy of the target's head ({copy.nbytes() / 1e9:.2f} GB) for steps of fewer than "
        f"{wide} rows, {speedup:.1f}x faster at one row here"
    )


def _crossover(head: nn.Linear, copy: Int8Linear, seconds: Seconds) -> tuple[int, float]:
    """(the narrowest probe width at which ``head`` was as fast as ``copy``, or twice the widest
    where it never was; the copy's speed-up at one row)."""
    speedup = 0.0
    for rows in PROBE_WIDTHS:
        x = torch.randn(rows, head.in_features, dtype=head.weight.dtype)
        own, copied = seconds(head, x), seconds(copy, x)
        if rows == PROBE_WIDTHS[0]:
            speedup = own / max(copied, 1e-12)
        if own <= copied:
            return rows, speedup
    return PROBE_WIDTHS[-1] * 2, speedup


def _first_rows(head: nn.Linear, rows: int) -> nn.Linear:
    """A linear layer of ``head``'s class over views of its first ``rows`` output rows."""
    with torch.device("meta"):
        part = nn.Linear(head.in_features, rows, bias=head.bias is not None)
    part.__class__ = type(head)
    part.weight = nn.Parameter(head.weight.detach()[:rows], requires_grad=False)
    if head.bias is not None:
        part.bias = nn.Parameter(head.bias.detach()[:rows], requires_grad=False)
    return part
