"""The compute dtype (``--dtype``): what the target's matrices are multiplied in.

On a GPU, ``auto`` is bfloat16 where the GPU has it, else float16.  On a CPU the
answer depends on the chip: bfloat16 products are only fast where the CPU has bf16
matrix instructions (Intel AMX-BF16 or AVX512-BF16); elsewhere they are emulated
and run far slower than float32.  Measured per 8960x1536 product (2 threads, ms, the
faster of the two layouts of :mod:`specchat.cpulinear`; ``benchmarks/cpu_dtype.py`` and,
for the first row, ``benchmarks/cpu_matmul.py``):

  =========================================  ======  ========  =========
  CPU                                         rows    float32   bfloat16
  =========================================  ======  ========  =========
  2 AMD EPYC cores, AVX2 only                 16      9.4       535
  2 Intel Xeon cores with AMX-BF16             16      2.3       0.84
  2 Intel Xeon cores with AMX-BF16             256     26.2      4.8
  =========================================  ======  ========  =========

So ``auto`` on a CPU is bfloat16 when ``/proc/cpuinfo`` lists ``amx_bf16`` or
``avx512_bf16``, float32 otherwise.  bfloat16 rounds a tree pass and a one-token pass
differently, so where the target's two best tokens are within that noise, speculative and
plain greedy decoding can pick different ones; ``--dtype float32`` keeps them identical
(``docs/benchmarks.md`` measures how often they part in bfloat16).
"""

from __future__ import annotations

from pathlib import Path

import torch

from specchat.common.errors import ConfigError
from specchat.common.system import read_cpuinfo

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # native bf16 dot products


def cpu_flags(cpuinfo: Path | None = None) -> frozenset[str]:
    """The first processor's feature flags (x86 ``flags``, Arm ``Features``); empty if unreadable."""
    return read_cpuinfo(cpuinfo).flags


def cpu_has_fast_bf16(flags: set[str] | None = None) -> bool:
    return bool(set(BF16_CPU_FLAGS) & (cpu_flags() if flags is None else flags))


def resolve_compute_dtype(choice: str, device: torch.device, flags: set[str] | None = None) -> tuple[torch.dtype, str]:
    """(dtype, one line saying why) for ``--dtype choice`` on ``device``."""
    if choice not in DTYPE_CHOICES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {choice!r}")
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if choice == "bfloat16" and not bf16:
            raise ConfigError("--dtype bfloat16: this GPU has no bfloat16", "use --dtype float16 or auto")
        if choice != "auto":
            return getattr(torch, choice), f"compute {choice}: --dtype {choice}"
        return (torch.bfloat16, "compute bfloat16: the GPU has it") if bf16 else (torch.float16, "compute float16: the GPU has no bfloat16")
    flags = cpu_flags() if flags is None else flags
    found = [flag for flag in BF16_CPU_FLAGS if flag in flags]
    if choice == "bfloat16" and not found:
        return torch.bfloat16, "compute bfloat16: --dtype bfloat16 (this CPU has no bf16 matrix instructions: expect it slower than float32)"
    if choice != "auto":
        return getattr(torch, choice), f"compute {choice}: --dtype {choice}"
    if found:
        return torch.bfloat16, f"compute bfloat16: the CPU has {found[0]} (bf16 matrix products run several times faster than float32)"
    return torch.float32, "compute float32: the CPU has no bf16 matrix instructions (amx_bf16 / avx512_bf16)"


def cpu_auto_dtype() -> str:
    """What ``--dtype auto`` computes in on this CPU."""
    return dtype_name(resolve_compute_dtype("auto", torch.device("cpu"))[0])


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
