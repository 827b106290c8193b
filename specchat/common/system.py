"""Facts the kernel tells about this machine's processor, read from ``/proc/cpuinfo``, and the
identity saved timings are kept under (this processor, this code)."""

from __future__ import annotations

import functools
import hashlib
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


def measurement_identity(cpu: CpuInfo | None = None) -> str:
    """What a saved timing (calibrated step costs, a draft's measured speed) was measured with
    besides its settings: this processor and this very code.  The package's version alone does
    not change when a checkout's code does, and a faster draft step must be measured again, so
    the version is followed by a digest of the package's source files."""
    from specchat import __version__

    name = (cpu or read_cpuinfo()).name or "unknown"
    return f"cpu={'_'.join(name.split())} specchat={__version__}+{_source_digest()}"


@functools.cache
def _source_digest() -> str:
    return source_digest(Path(__file__).resolve().parent.parent)  # read once per process


def source_digest(root: Path) -> str:
    """12 hex digits of SHA-256 over the Python files under ``root`` (relative path and bytes)."""
    digest = hashlib.sha256()
    for file in sorted(root.rglob("*.py")):
        digest.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:12]
