"""Writing files so that a crash, Ctrl-C or a full disk never leaves a half-written one trusted,
and checking the disk has room before a long write."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
        if isinstance(exc, OSError) and disk_full(exc):
            raise ResourceError(f"the disk filled up while writing {path}", "free some space and run again") from exc
        raise


LOCK = ".lock"


@contextmanager
def build_lock(lock_file: Path, notice: Callable[[str], None] = lambda message: None, what: str = "") -> Iterator[None]:
    """Hold the exclusive lock of ``lock_file`` (``flock``; the file and its folder are created
    if need be; a directory's is its :data:`LOCK` file) while building something, so that a
    second process building the same thing waits, telling ``notice`` once that it waits for
    ``what`` ("building DIR"), and then finds the work done.  The kernel drops the lock when
    its holder exits, however it exits."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "ab") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            notice(f"waiting for another specchat process to finish {what}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def disk_full(exc: BaseException) -> bool:
    """Whether a failed write failed for want of space (an OSError, or a library's own error that
    names the OS error, as safetensors' does)."""
    return getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc)


def check_free_disk(directory: Path, needed: int, what: str, fix: str) -> None:
    """Refuse, before writing, a ``needed``-byte write that the disk under ``directory`` cannot hold.
    ``what`` completes "not enough disk ...", e.g. "for the layer store"."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise ResourceError(
            f"not enough disk {what}: {needed / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free at {directory}", fix
        )
