"""The ``specchat`` console script.  It imports nothing heavy before installing the Ctrl-C
handler, so that an interrupt during the imports, too, ends with one line and exit 130."""

from __future__ import annotations

import sys

from specchat.cli.interrupts import EXIT_INTERRUPTED, INTERRUPTS


def main() -> None:
    INTERRUPTS.install()
    try:
        from specchat.cli.app import app

        app()
    except SystemExit:
        if not INTERRUPTS.pending:
            raise
        _interrupted()  # typer turned a Ctrl-C outside any command (while parsing) into a silent exit
    except BaseException as exc:  # only what escaped the commands' error boundary, e.g. during imports
        if not INTERRUPTS.caused(exc):
            raise
        _interrupted()


def _interrupted() -> None:
    print("\ninterrupted", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)
