"""The LM head a self draft computes its logits with: the target's own, or, where one is
measured faster on the machine at hand, a low-bit copy of it for the draft's narrow steps.

A draft step's products over its decoder layers are low-bit, but its head is the target's: a
(vocab, hidden) matrix the step reads whole.  For the demo target that is 0.47 GB in bf16 and
0.93 GB in float32, and it was a third or more of a width-1 int4 step: 83 of 273 ms on a 2-core
AMD EPYC with AVX2 (float32), 36 of 92 ms on a 2-core AMD EPYC Zen 5 with AVX512-BF16 (bf16;
benchmarks/draft_step_profile.py, docs/benchmarks.md, sessions 34 and 35).  Two copies are
weighed, each only for the rows it serves:

``int8``       one scale per vocabulary row (0.23 GB for the demo target), read by torch's int8
               kernel; for a float32 head only (over a bf16 one it saved 1 ms of an 86 ms step, the
               shortlist 15).
``shortlist``  an int4 copy (groups of 32, rounded to the nearest level: 0.15 GB) ranks the whole
               vocabulary; the best :data:`SHORTLIST` tokens of each row are then scored again
               from the target's own rows, so the tokens a tree grows from carry the target
               head's logits (every other token keeps the copy's).

Either copy changes only the draft's scores -- a deterministic function of its input, so q stays
a distribution the verification rules hold for; the target verifies with its own head.  The
copy's kernels cost more per row than the dense product, so from :attr:`NarrowHead.wide_rows`
rows on the target's head is used.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from specchat.weights.lowbit import INT4_GROUP, Int4Linear, Int8Linear, median_seconds

PROBE_ROWS = 32_768  # vocabulary rows timed: 0.2 GB of float32, past a 32 MB L3 even as int8
PROBE_WIDTHS = (1, 2, 4, 8, 16, 32, 64)  # draft-step widths tried, narrowest first
SHORTLIST = 64  # tokens per row the shortlist head scores again with the target's rows


class Shortlist(nn.Module):
    """Logits of ``head`` W for x, approximated by an int4 copy of W and made exact for the best
    :data:`SHORTLIST` tokens of each row:

        a = x Wq^T  (N, V);   S = top-k(a) per row  (N, k);   a[n, S[n]] = W[S[n]] x[n]  (+ b)
    """

    def __init__(self, head: nn.Linear, copy: Int4Linear, shortlist: int = SHORTLIST) -> None:
        super().__init__()
        self.copy, self.shortlist = copy, min(shortlist, head.out_features)
        self.__dict__["head"] = head  # not a submodule: the target's tensors, not this model's own
        self.out_features = head.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., hidden) -> (..., vocab)
        rows = x.reshape(-1, x.shape[-1])  # (N, hidden)
        approx = self.copy(rows)  # (N, V)
        best = approx.topk(self.shortlist, dim=-1).indices  # (N, k)
        weight = self.head.weight.detach()  # (V, hidden)
        exact = torch.einsum("nkh,nh->nk", weight[best], rows.to(weight.dtype))  # (N, k)
        if self.head.bias is not None:
            exact = exact + self.head.bias.detach()[best]
        return approx.scatter_(-1, best, exact.to(approx.dtype)).reshape(*x.shape[:-1], -1)

    def nbytes(self) -> int:
        return self.copy.nbytes()


class NarrowHead(nn.Module):
    """y = x W^T by ``copy`` (an int8 copy of the head W, or a :class:`Shortlist`) for fewer than
    ``wide_rows`` rows, by ``head`` itself (the target's, shared) from there."""

    def __init__(self, head: nn.Linear, copy: nn.Module, wide_rows: int) -> None:
        super().__init__()
        self.copy, self.wide_rows = copy, wide_rows
        self.__dict__["head"] = head  # not a submodule: the target's tensors, not this model's own
        self.out_features = head.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., hidden) -> (..., vocab)
        rows = x.numel() // x.shape[-1]
        return self.copy(x) if rows < self.wide_rows else self.head(x)

    def nbytes(self) -> int:
        return self.copy.nbytes()


class Candidate(NamedTuple):
    name: str  # as the progress line says it
    make: Callable[[nn.Linear], nn.Module]  # a head (or its probed rows) -> its copy
    nbytes: Callable[[int, int], int]  # (vocab, hidden) -> the copy's bytes


def _int8_bytes(vocab: int, hidden: int) -> int:
    return vocab * hidden + vocab * 2  # int8 weights and a bf16 scale per row


def _shortlist_bytes(vocab: int, hidden: int) -> int:
    return vocab * hidden // 2 + (hidden // INT4_GROUP) * vocab * 2 * 2  # 4-bit weights; a bf16 (scale, zero) per group


INT8 = Candidate("an int8 copy of the target's head", Int8Linear.quantize, _int8_bytes)
SHORTLIST_INT4 = Candidate(
    f"an int4 copy of the target's head to rank the vocabulary, each row's best {SHORTLIST} scored by the head itself",
    lambda head: Shortlist(head, Int4Linear.quantize(head, fit=False)), _shortlist_bytes,
)


def candidates(vocab: int, hidden: int, dtype: torch.dtype) -> tuple[Candidate, ...]:
    """The copies weighed for a (vocab, hidden) head computing in ``dtype``: none below
    :data:`PROBE_ROWS` tokens (a small head costs little), none for float16 or float64; int8 only
    for float32."""
    if vocab < PROBE_ROWS or dtype not in (torch.float32, torch.bfloat16):
        return ()
    shortlist = (SHORTLIST_INT4,) if hidden % INT4_GROUP == 0 and vocab % 16 == 0 else ()  # the int4 kernel's shapes
    return ((INT8,) if dtype == torch.float32 else ()) + shortlist


def copy_bytes(vocab: int, hidden: int, dtype: torch.dtype) -> int:
    """RAM the largest copy the draft of a (vocab, hidden) head in ``dtype`` may keep takes."""
    return max((candidate.nbytes(vocab, hidden) for candidate in candidates(vocab, hidden, dtype)), default=0)


Seconds = Callable[[nn.Module, torch.Tensor], float]  # (a head, its input rows) -> seconds one product takes


def timed_product(head: nn.Module, rows: torch.Tensor, clock: Callable[[], float] = time.perf_counter) -> float:
    """Median seconds of ``head(rows)`` over 3 runs after a warm-up."""
    return median_seconds(lambda: head(rows), clock, repeats=3)


def draft_head(head: nn.Linear, dtype: torch.dtype, seconds: Seconds = timed_product) -> tuple[nn.Module, str]:
    """The head a self draft of a target computing in ``dtype`` uses, and one line saying which and why.

    Each of :func:`candidates` is made of the head's first :data:`PROBE_ROWS` rows and timed
    (``seconds``) against those rows of the head at each of :data:`PROBE_WIDTHS` rows of input;
    the copy fastest at one row is made whole and used below the first width at which the
    target's product was as fast -- none, where no copy beat it at one row."""
    weighed = candidates(head.out_features, head.in_features, dtype)
    if not weighed or head.weight.device.type != "cpu":
        return head, "the target's head"
    part = _first_rows(head, PROBE_ROWS)
    timed = [(candidate, *_crossover(part, candidate.make(part), seconds)) for candidate in weighed]
    best, wide, speedup = max(timed, key=lambda entry: entry[2])
    if wide == PROBE_WIDTHS[0]:
        return head, f"the target's head (no copy was faster here: {speedup:.2f}x at one row)"
    copy = best.make(head)
    return NarrowHead(head, copy, wide), (
        f"{best.name} ({copy.nbytes() / 1e9:.2f} GB) for steps of fewer than "
        f"{wide} rows, {speedup:.1f}x faster at one row here"
    )


def _crossover(head: nn.Linear, copy: nn.Module, seconds: Seconds) -> tuple[int, float]:
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
