"""4-bit NF4 weights (bitsandbytes), as the layer store keeps and streams them.

NF4 (QLoRA, arXiv 2305.14314, section 3) splits a weight matrix, flattened,
into blocks of 64 values; each block keeps one float32 ``absmax`` and each value
becomes the index (4 bits) of the nearest of 16 normal-distribution quantiles
``code`` in [-1, 1]:  w ~= code[index] * absmax[block].  Two indices share one
byte (high nibble first), so a matrix of n values takes n/2 bytes + n/64 * 4
bytes of absmax: 4.5 bits per weight.  No double quantisation, so that
dequantising is one pass.

Only 2-D weights (the linear layers) are quantised; norms and biases stay 16-bit,
as do the embeddings and the LM head (resident anyway).
"""

from __future__ import annotations

import logging
import math

import torch

from specchat.common.errors import ConfigError

BLOCK = 64
DEQUANT_DTYPE = torch.float16  # a fresh result's dtype when no ``out`` is given (the layer slots always give one)


# bitsandbytes warns, on CPUs with AVX512-BF16, that it could not fetch an optional 4-bit matmul
# kernel (the ``kernels`` package, from the hub).  specchat never multiplies in 4 bits (it
# dequantises into 16-bit slots), so that line only alarms users; keep it out of their stderr.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _bnb():
    try:
        import bitsandbytes.functional as functional
    except ImportError as exc:  # pragma: no cover - bitsandbytes is a dependency
        raise ConfigError(
            "4-bit weights need bitsandbytes, which is not installed", "pip install 'bitsandbytes>=0.49' or use --quant 16bit"
        ) from exc
    return functional


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """The tensors stored as NF4: the 2-D weights of a decoder layer."""
    return name.endswith(".weight") and len(shape) == 2


def packed_bytes(shape: tuple[int, ...]) -> int:
    return (torch.Size(shape).numel() + 1) // 2


def absmax_count(shape: tuple[int, ...]) -> int:
    return -(-torch.Size(shape).numel() // BLOCK)


def absmax_offset(shape: tuple[int, ...]) -> int:
    """Where the float32 absmax follows the packed bytes (4-byte aligned)."""
    return (packed_bytes(shape) + 3) // 4 * 4


def nf4_bytes(shape: tuple[int, ...]) -> int:
    return absmax_offset(shape) + 4 * absmax_count(shape)


def quantize_nf4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 (n/2,), absmax float32 (n/64,)) of ``weight``, quantised from float32."""
    functional = _bnb()
    packed, state = functional.quantize_4bit(
        weight.detach().float().contiguous(), blocksize=BLOCK, compress_statistics=False, quant_type="nf4"
    )
    return packed.view(-1), state.absmax.float().view(-1)


_CODES: dict[torch.device, torch.Tensor] = {}  # the NF4 code book per device (a copy per call would sync)


def dequantize_nf4(
    packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...], out: torch.Tensor | None = None
) -> torch.Tensor:
    """The (shape) weight from its packed bytes and block absmax: in :data:`DEQUANT_DTYPE`, or
    written straight into ``out`` (its dtype) when given -- the layer slot's parameter itself."""
    if out is not None and out.device.type == "cpu" and _dequantize_into_on_cpu(packed, absmax, out):
        return out
    functional = _bnb()
    device = packed.device
    if device not in _CODES:
        _CODES[device] = functional.get_4bit_type("nf4", device="cpu").to(device)
    on_cpu = device.type == "cpu"
    state = functional.QuantState(
        absmax=absmax.to(device),
        # On a CPU the op is given one flat row: its AVX-512 path reads one absmax per row, which
        # is wrong where 64-weight blocks span rows (tests/test_offload.py).
        shape=torch.Size((math.prod(shape),) if on_cpu else shape),
        code=_CODES[device],
        blocksize=BLOCK,
        quant_type="nf4",
        dtype=out.dtype if out is not None else DEQUANT_DTYPE,
    )
    if on_cpu:  # bitsandbytes' CPU op takes no ``out``; its flat result comes back as (1, n)
        weight = functional.dequantize_4bit(packed.view(-1, 1), state).view(shape)
        return out.copy_(weight) if out is not None else weight
    return functional.dequantize_4bit(packed.view(-1, 1), state, out=out)


_CPU_KERNELS = {torch.float32: "cdequantize_blockwise_cpu_nf4_fp32", torch.bfloat16: "cdequantize_blockwise_cpu_nf4_bf16",
                torch.float16: "cdequantize_blockwise_cpu_nf4_fp16"}


def _dequantize_into_on_cpu(packed: torch.Tensor, absmax: torch.Tensor, out: torch.Tensor) -> bool:
    """bitsandbytes' CPU NF4 kernel writing ``out`` in place; False where it cannot (then the op is used).

    The registered CPU op allocates its result, which costs more than the kernel: for an
    8960x1536 matrix the kernel alone into a float32 parameter takes 9.5 ms, the op into a fresh
    16-bit tensor plus the copy 21.6 ms (one thread; benchmarks/nf4_dequant.py).
    """
    import ctypes

    try:
        from bitsandbytes.cextension import lib
    except ImportError:
        return False
    # The library wrapper answers any missing symbol with a function that raises: look in the
    # loaded CDLL itself (absent when the native library failed to load), else use the op.
    kernel = getattr(getattr(lib, "_lib", None), _CPU_KERNELS.get(out.dtype, ""), None)
    if kernel is None:
        return False
    rows, columns = (out.shape[0] if out.dim() == 2 else 1), out.shape[-1]
    if columns % BLOCK:  # blocks run across rows: the AVX-512 path indexes absmax per row, so pass one flat row
        rows, columns = 1, out.numel()
    if (
        out.dim() > 2 or columns % 2 or not out.is_contiguous() or packed.dtype != torch.uint8
        or packed.device.type != "cpu" or absmax.device.type != "cpu"
        or packed.numel() * 2 != out.numel() or absmax.dtype != torch.float32 or absmax.numel() != -(-out.numel() // BLOCK)
    ):
        return False
    packed, absmax = packed.contiguous(), absmax.contiguous()
    kernel(
        ctypes.c_void_p(packed.data_ptr()), ctypes.c_void_p(absmax.data_ptr()), ctypes.c_void_p(out.data_ptr()),
        ctypes.c_longlong(BLOCK), ctypes.c_longlong(rows), ctypes.c_longlong(columns),
    )
    return True


def roundtrip_nf4(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as the 4-bit store gives it back into a float32 layer (for tests and quality checks)."""
    packed, absmax = quantize_nf4(weight)
    out = torch.empty(weight.shape, dtype=torch.float32)
    return dequantize_nf4(packed, absmax, tuple(weight.shape), out=out).to(weight.dtype)
