"""Facts the kernel tells about this machine's processor, read from ``/proc/cpuinfo``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class CpuInfo:
    name: str | None  # the "model name" line; None where the kernel gives none (many Arm boards)
    flags: frozenset[str]  # the first processor's feature flags (x86 ``flags``, Arm ``Features``)


def read_cpuinfo(path: Path | None = None) -> CpuInfo:
    """The first processor's name and flags; empty where the file cannot be read."""
    try:
        text = (path or CPUINFO).read_text()
    except OSError:
        return CpuInfo(None, frozenset())
    name, flags = None, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("flags", "Features") and flags is None:
            flags = frozenset(value.split())
        elif key == "model name" and value.strip() and name is None:
            name = value.strip()
    return CpuInfo(name, flags or frozenset())
