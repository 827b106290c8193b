"""Low-bit copies of a decoder layer's linear layers, for a draft made from the target itself.

Both kinds are weight-only (the activations are not rounded to a grid, so the main error is
the weights' rounding) and run on torch's own CPU kernels, which take their rows and scales in
bfloat16 even where the target computes in float32 (:func:`kernel_dtype`):

``int8``  symmetric, one scale per output row: W = s q, q in -127..127, s = max|W_row| / 127;
          ``torch._weight_int8pack_mm`` for narrow inputs; for wide ones (:attr:`Int8Linear.wide_rows`
          rows and more) q is widened to the compute dtype and multiplied by the fast dense
          kernel, y = (x q^T) s, since the row scale commutes with the product.
``int4``  asymmetric, one (scale, min) per group of :data:`INT4_GROUP` input columns, fitted by
          least squares (:func:`int4_rounding`; or from min to max, unfitted):
          w = min + q * scale, q in 0..15; ``torch._weight_int4pack_mm_for_cpu``, which reads
          w = (q - 8) * scale + zero, so zero = min + 8 * scale.

Why these (2-core Xeon with AMX, demo target in bf16, benchmarks/self_draft.py and
benchmarks/lowbit_kernels.py): rounding only the weights keeps the draft's favourite equal to
the target's at most positions, where torch.ao's dynamic int8 (which also rounds every
activation row, per tensor) fell to 0.74.  The weight-only kernels are matrix-vector loops:
8960x1536 at 1 row takes 0.49 ms (int8) and 0.37 ms (int4) against 1.00 ms in bf16, at 8 rows
1.48 and 1.41 against 1.02: the int8 kernel's cost grows with the rows (5.7 ms at 32), where
widening q to bf16 (1.0 ms) and the AMX product (1.2 ms) cost 2.6 ms at 32 rows and 3.2 at 64;
:func:`tune_int8` measures where that crossover lies on the machine at hand.  torchao 0.18 was
tried first: its int8 weight-only layer ran 2-13x slower than bf16 here and it no longer has a
CPU int4 packing, so these call torch's kernels directly.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

LOWBIT_KINDS = ("int8", "int4")
LOWBIT_BITS = {"int8": 8, "int4": 4}
INT4_GROUP = 32  # input columns per (scale, min); see int4_group
QUANTIZE_ROWS = 8192  # output rows rounded at a time (a head of 152k rows never whole in float32)


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype torch's int4 and int8 CPU kernels take the rows (and the scales) in, for layers
    computing in ``dtype``: bfloat16 for float32, whose kernel paths are scalar loops.

    On a 2-core Xeon without bf16 instructions (AVX-512 VNNI only), an 8960x1536 product took
    0.62 / 3.2 / 7.7 ms at 1 / 8 / 32 rows in int4 with bf16 rows and scales against 26 / 175 / 689
    ms with float32 ones (int8: 0.88 / 4.1 / 10.3 against 10 / 124 / 492; a dense float32 product
    2.1 / 7.5 / 7.5), so a float32 copy rounds its rows to bf16 for the product and back after it
    (benchmarks/lowbit_kernel_dtypes.py; docs/benchmarks.md, session 27)."""
    return torch.bfloat16 if dtype == torch.float32 else dtype


class LowBitLinear(nn.Module):
    """y = x W^T + b for a low-bit W; the weights live in buffers, so ``state_dict`` saves them
    and a shell made on the meta device (:meth:`shell`) loads them back.  ``dtype`` is what x, y
    and b are in; the kernel's scales are in :func:`kernel_dtype` of it."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.kernel_dtype = kernel_dtype(dtype)
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype) if bias else None)

    @classmethod
    def shell(cls, linear: nn.Linear) -> LowBitLinear:
        """An empty one of ``linear``'s shape and dtype, to be filled by ``load_state_dict(assign=True)``."""
        with torch.device("meta"):
            return cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.product(x.reshape(-1, self.in_features))  # (N, out)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def product(self, rows: torch.Tensor) -> torch.Tensor:
        """(N, in) -> (N, out), both in the rows' dtype."""
        raise NotImplementedError

    def nbytes(self) -> int:
        return sum(buffer.nbytes for buffer in self.buffers())


class Int8Linear(LowBitLinear):
    """W = s q per output row (see the module docstring); scales in the layer's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__(in_features, out_features, bias, dtype)
        self.register_buffer("weight_int8", torch.empty(out_features, in_features, dtype=torch.int8))  # (out, in)
        self.register_buffer("scales", torch.empty(out_features, dtype=self.kernel_dtype))  # (out,)

    @classmethod
    def quantize(cls, linear: nn.Linear) -> Int8Linear:
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype)
        out.weight_int8 = torch.empty(linear.out_features, linear.in_features, dtype=torch.int8)
        out.scales = torch.empty(linear.out_features, dtype=out.kernel_dtype)
        for start in range(0, linear.out_features, QUANTIZE_ROWS):  # a float32 temporary of one chunk, not of W
            weight = linear.weight.detach()[start:start + QUANTIZE_ROWS].float()  # (chunk, in)
            scale = (weight.abs().amax(1) / 127).clamp(min=1e-12)  # (chunk,)
            out.weight_int8[start:start + QUANTIZE_ROWS] = torch.round(weight / scale[:, None]).clamp(-127, 127)
            out.scales[start:start + QUANTIZE_ROWS] = scale
        if linear.bias is not None:
            out.bias = linear.bias.detach().clone()
        return out

    wide_rows = 1 << 30  # from this many input rows on, the widened product (set by tune_int8)

    def product(self, rows: torch.Tensor) -> torch.Tensor:  # rows (N, in) -> (N, out)
        if rows.shape[0] >= self.wide_rows:
            return self.widened_product(rows)
        return self.narrow_product(rows)

    def narrow_product(self, rows: torch.Tensor) -> torch.Tensor:
        """torch's int8 kernel, over the rows in the kernel's dtype."""
        return torch._weight_int8pack_mm(rows.to(self.kernel_dtype), self.weight_int8, self.scales).to(rows.dtype)

    def widened_product(self, rows: torch.Tensor) -> torch.Tensor:
        """(x q^T) s with q in the rows' dtype (exact: |q| <= 127 fits bf16 and half)."""
        return torch.mm(rows, self.weight_int8.to(rows.dtype).T).mul_(self.scales)


class Int4Linear(LowBitLinear):
    """w = min + q scale per group of input columns (see the module docstring), packed for torch's kernel."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__(in_features, out_features, bias, dtype)
        self.group = int4_group(in_features)
        self.register_buffer("packed", torch.empty(out_features, in_features // 2, dtype=torch.uint8))  # (out, in/2)
        # (in/g, out, 2): per group and output row, (scale, zero)
        self.register_buffer("scales_zeros", torch.empty(in_features // self.group, out_features, 2, dtype=self.kernel_dtype))

    @classmethod
    def quantize(cls, linear: nn.Linear, fit: bool = True) -> Int4Linear:
        """The copy of ``linear``, its groups fitted by :func:`int4_rounding`, or with ``fit`` False
        rounded to the nearest of 16 levels from min to max (six times faster; for a head's copy
        that only ranks tokens, :mod:`specchat.model.drafthead`)."""
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype)
        rows, group = linear.out_features, out.group
        packed, scales_zeros = [], []
        for start in range(0, rows, QUANTIZE_ROWS):  # a float32 temporary of one chunk, not of W
            weight = linear.weight.detach()[start:start + QUANTIZE_ROWS].float()  # (chunk, in)
            groups = weight.reshape(weight.shape[0], -1, group)  # (chunk, in/g, g)
            q, scale, low = int4_rounding(groups) if fit else _nearest_int4(groups)  # (chunk, in/g, g), 2 x (chunk, in/g)
            packed.append(torch._convert_weight_to_int4pack_for_cpu(q.reshape(weight.shape[0], -1).to(torch.int32), 1))
            scales_zeros.append(torch.stack([scale, low + 8 * scale], -1).transpose(0, 1).to(out.kernel_dtype))
        out.packed = torch.cat(packed)  # (out, in/2): rows packed independently
        out.scales_zeros = torch.cat(scales_zeros, 1).contiguous()  # (in/g, out, 2)
        if linear.bias is not None:
            out.bias = linear.bias.detach().clone()
        return out

    def product(self, rows: torch.Tensor) -> torch.Tensor:
        kernel_rows = rows.to(self.kernel_dtype)
        return torch._weight_int4pack_mm_for_cpu(kernel_rows, self.packed, self.group, self.scales_zeros).to(rows.dtype)


INT4_SPANS = (12, 13, 14, 15, 16, 17)  # the scales tried per group: (max - min) / span


def int4_rounding(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group of weights w (..., g) float32: q in 0..15 and (scale, min) with w ~ min + q scale,
    the least-squares fit over a few candidate grids.

    For each scale (max w - min w) / span, span in :data:`INT4_SPANS`, q = round((w - min w) / scale)
    (clipped to 0..15: spans over 15 give up the extremes for finer steps); given those q, the
    (min, scale) minimising sum (w - min - q scale)^2 is a line fit through the points (q, w):

        scale = (g Sqw - Sq Sw) / (g Sqq - Sq^2),   min = (Sw - scale Sq) / g

    (S: sums over the group), whose squared error expands into the same sums,

        E = Sww - 2 min Sw - 2 scale Sqw + g min^2 + 2 min scale Sq + scale^2 Sqq,

    and the candidate with the least E wins, group by group.  Plain round-to-nearest from min to
    max (span 15 before its fit) never wins against its own fit.  Weights already on a 4-bit grid
    per group whose values span 12 steps or more (a Q4_K GGUF's, dequantised) come back on it;
    others round with ~10% less error (docs/benchmarks.md, session 26).  Returns q (..., g),
    scale and min (...)."""
    n = groups.shape[-1]
    low, high = groups.amin(-1), groups.amax(-1)  # (...)
    sum_w, sum_ww = groups.sum(-1), (groups * groups).sum(-1)
    best = None  # (E, span, scale, min), each (...)
    for span in INT4_SPANS:
        q = _int4_levels(groups, low, (high - low) / span)  # (..., g)
        sum_q, sum_qq, sum_qw = q.sum(-1), (q * q).sum(-1), (q * groups).sum(-1)
        det = n * sum_qq - sum_q * sum_q  # 0 where every q is equal
        fitted = (n * sum_qw - sum_q * sum_w) / det.clamp(min=1e-12)
        fits = (det > 0) & (fitted > 0)
        scale = torch.where(fits, fitted, ((high - low) / span).clamp(min=1e-12))
        minimum = torch.where(fits, (sum_w - scale * sum_q) / n, low)
        err = (sum_ww - 2 * minimum * sum_w - 2 * scale * sum_qw + n * minimum * minimum
               + 2 * minimum * scale * sum_q + scale * scale * sum_qq)
        if best is None:
            best = (err, torch.full_like(err, span), scale, minimum)
            continue
        better = err < best[0]
        best = (torch.minimum(err, best[0]), torch.where(better, span, best[1]),
                torch.where(better, scale, best[2]), torch.where(better, minimum, best[3]))
    _, span, scale, minimum = best
    return _int4_levels(groups, low, (high - low) / span), scale, minimum


def _nearest_int4(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q in 0..15 on the grid from each group's min to its max, and (scale, min) (...)."""
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    return _int4_levels(groups, low, scale), scale, low


def _int4_levels(groups: torch.Tensor, low: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """q = round((w - low) / step) in 0..15, per group (step and low: (...))."""
    return torch.round((groups - low[..., None]) / step.clamp(min=1e-12)[..., None]).clamp_(0, 15)


def rounding_identity(kind: str, dtype: torch.dtype) -> dict:
    """What a saved copy of ``kind`` computing in ``dtype`` records of how it was rounded and what
    its scales are in, so a copy made otherwise is rebuilt."""
    scales = {"scales": str(kernel_dtype(dtype))}
    return scales | ({"group": INT4_GROUP, "rounding": "fit", "spans": list(INT4_SPANS)} if kind == "int4" else {})


def int4_group(in_features: int) -> int:
    """:data:`INT4_GROUP` (32: the smallest group torch's int4 CPU kernel takes), where it divides ``in_features``.

    Groups of 32 rather than 64 cost 1/16 byte more per weight and ~10% more time per draft step
    (126 against 114 ms for the demo target on a 2-core Xeon) and round closer: the demo target's
    top-1 agreement 0.969 against 0.931 (docs/benchmarks.md, session 26).  Part of that is the
    demo's origin -- a Q4_K GGUF, whose weights already sit on a 4-bit grid per block of 32 --
    but weights on no such grid (its Q6_K tensors) still round with 13-15% less error."""
    if in_features % INT4_GROUP == 0:
        return INT4_GROUP
    raise ValueError(f"int4 needs layers whose input width is a multiple of {INT4_GROUP}, got {in_features}")


def tune_int8(layers: list[nn.Module], dtype: torch.dtype, clock=time.perf_counter) -> int:
    """Set every :class:`Int8Linear` in ``layers`` to widen from the smallest input width (of
    2..64) at which the widened product beat the int8 kernel on their largest weight; returns it
    (:attr:`Int8Linear.wide_rows`'s default when it never did)."""
    linears = [m for layer in layers for m in layer.modules() if isinstance(m, Int8Linear)]
    if not linears:
        return Int8Linear.wide_rows
    probe = max(linears, key=lambda m: m.in_features * m.out_features)
    crossover = Int8Linear.wide_rows
    for rows in (2, 4, 8, 12, 16, 24, 32, 48, 64):
        x = torch.randn(rows, probe.in_features).to(dtype)
        narrow = median_seconds(lambda: probe.narrow_product(x), clock)
        if median_seconds(lambda: probe.widened_product(x), clock) < narrow:
            crossover = rows
            break
    for linear in linears:
        linear.wide_rows = crossover
    return crossover


def median_seconds(work, clock, repeats: int = 5) -> float:
    work()
    times = []
    for _ in range(repeats):
        started = clock()
        work()
        times.append(clock() - started)
    return statistics.median(times)


_LINEARS = {"int8": Int8Linear, "int4": Int4Linear}


def quantize_layer(layer: nn.Module, kind: str, shell: bool = False) -> nn.Module:
    """``layer`` (in place) with every ``nn.Linear`` replaced by its low-bit ``kind``; with ``shell``
    by empty ones on the meta device, for a ``load_state_dict(..., assign=True)`` of saved ones."""
    if kind not in _LINEARS:
        raise ValueError(f"low-bit kind must be one of {', '.join(LOWBIT_KINDS)}, got {kind!r}")
    make = _LINEARS[kind].shell if shell else _LINEARS[kind].quantize
    for parent in list(layer.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, make(child))
    return layer


def layer_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """What the hidden states are in inside a low-bit layer: the target's compute dtype (float32
    for a float64 target, whose rows the kernels then take in bf16: :func:`kernel_dtype`)."""
    return torch.float32 if compute_dtype == torch.float64 else compute_dtype


def lowbit_bytes(layer: nn.Module) -> int:
    """Bytes a quantised layer holds: packed weights, scales, norms and biases."""
    total = sum(m.nbytes() for m in layer.modules() if isinstance(m, LowBitLinear))
    return total + sum(p.nbytes for p in layer.parameters())
