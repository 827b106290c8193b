"""Writing files so that a crash, Ctrl-C or a full disk never leaves a half-written one trusted,
and checking the disk has room before a long write."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from specchat.common.errors import ResourceError


def atomic_write(path: Path, data: bytes | str, mode: int | None = None) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path``:
    readers see the old file or the whole new one, never a part.  ``mode``: its permissions
    (e.g. 0o600); the temporary file is removed on any failure.  A full disk is a
    :class:`ResourceError`; other ``OSError``s propagate."""
    payload = data.encode() if isinstance(data, str) else data
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException as exc:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise ResourceError(f"the disk filled up while writing {path}", "free some space and run again") from exc
        raise


def check_free_disk(directory: Path, needed: int, what: str, fix: str) -> None:
    """Refuse, before writing, a ``needed``-byte write that the disk under ``directory`` cannot hold.
    ``what`` completes "not enough disk ...", e.g. "for the layer store"."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise ResourceError(
            f"not enough disk {what}: {needed / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free at {directory}", fix
        )
