"""Where library errors become CLI errors: one line on stderr and an exit status."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import typer

from .errors import SpecchatError

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
        print("error: out of memory; choose a smaller model or close other programs", file=sys.stderr)
        raise typer.Exit(3) from None
