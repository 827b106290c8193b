"""Where library errors become CLI errors: one line on stderr and an exit status."""

from __future__ import annotations

import errno
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import typer

from specchat import SpecchatError
from specchat.cli.interrupts import EXIT_INTERRUPTED, INTERRUPTS
from specchat.common.paths import cache_dir, config_file, state_dir


@contextmanager
def error_boundary(debug: bool = False) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        if INTERRUPTS.caused(exc):  # e.g. a Ctrl-C inside an import, re-raised as another error
            _interrupted()
        _report(exc, debug)
    except KeyboardInterrupt:
        _interrupted()


def _interrupted() -> None:
    INTERRUPTS.handled()  # said here, once
    sys.stdout.flush()
    print("\ninterrupted", file=sys.stderr)
    raise typer.Exit(EXIT_INTERRUPTED) from None


def _report(exc: Exception, debug: bool) -> None:
    """One line and an exit status for an error a user can act on; re-raise any other."""
    line, code = _line_for(exc)
    if line is None:
        raise exc
    if debug:
        traceback.print_exception(exc)
    if line:
        print(line, file=sys.stderr)
    raise typer.Exit(code) from None


def _line_for(exc: Exception) -> tuple[str | None, int]:
    if isinstance(exc, SpecchatError):
        return exc.line(), exc.exit_code
    if isinstance(exc, OSError) and exc.errno == errno.EPIPE:  # the reader of stdout went away (`| head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return "", 1
    if isinstance(exc, OSError):
        return path_error_line(exc), 2
    if isinstance(exc, MemoryError) or isinstance(exc, RuntimeError) and _is_allocation_failure(exc):
        return OUT_OF_MEMORY, 3
    return None, 0


_ALLOCATION_FAILURES = ("can't allocate memory", "out of memory", "not enough memory")


def _is_allocation_failure(exc: RuntimeError) -> bool:
    message = str(exc).lower()
    return any(fragment in message for fragment in _ALLOCATION_FAILURES)


OUT_OF_MEMORY = (
    "error: out of memory; use --offload ssd with a smaller --ram-budget, a smaller --budget, "
    "a smaller model, or close other programs"
)

_WHY = {
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "it is a directory",
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
}


def path_error_line(exc: OSError) -> str:
    """One line for a file-system error the library did not turn into a SpecchatError: which
    path, why, and which setting moves specchat's files elsewhere."""
    path = exc.filename or "a file"
    why = _WHY.get(exc.errno, exc.strerror or str(exc))
    return f"error: cannot use {path}: {why}; {_fix(str(path), exc.errno)}"


def _fix(path: str, number: int | None) -> str:
    if number in (errno.ENOSPC, errno.EDQUOT):
        return "free some space and run again"
    homes = (
        (cache_dir(), "models and layer stores", "XDG_CACHE_HOME (or --store, for the stores)"),
        (config_file().parent, "its configuration and calibration", "XDG_CONFIG_HOME"),
        (state_dir(), "chat history and sessions", "XDG_STATE_HOME"),
    )
    for home, what, setting in homes:
        if path.startswith(str(home)) or str(home).startswith(path):  # in it, or a folder above it
            return f"specchat keeps {what} there: set {setting} to a writable directory"
    return "check the path (it must be a writable directory where one is expected) or choose another"
