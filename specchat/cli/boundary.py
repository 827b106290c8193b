"""Where library errors become CLI errors: one line on stderr and an exit status."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import typer

from specchat import SpecchatError

EXIT_INTERRUPTED = 130


@contextmanager
def error_boundary(debug: bool = False) -> Iterator[None]:
    try:
        yield
    except SpecchatError as exc:
        if debug:
            traceback.print_exc()
        print(exc.line(), file=sys.stderr)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        sys.stdout.flush()
        print("\ninterrupted", file=sys.stderr)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except MemoryError:
        _out_of_memory(debug)
    except RuntimeError as exc:  # torch reports a failed allocation as a RuntimeError
        if not _is_allocation_failure(exc):
            raise
        _out_of_memory(debug)


_ALLOCATION_FAILURES = ("can't allocate memory", "out of memory", "not enough memory")


def _is_allocation_failure(exc: RuntimeError) -> bool:
    message = str(exc).lower()
    return any(fragment in message for fragment in _ALLOCATION_FAILURES)


def _out_of_memory(debug: bool) -> None:
    if debug:
        traceback.print_exc()
    print(
        "error: out of memory; use --offload ssd with a smaller --ram-budget, a smaller --budget, "
        "a smaller model, or close other programs",
        file=sys.stderr,
    )
    raise typer.Exit(3) from None
