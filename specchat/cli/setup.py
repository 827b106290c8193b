"""`specchat setup`: ask before a download on a terminal, then hand over to :mod:`specchat.app.setup`."""

from __future__ import annotations

import sys

from specchat import RunConfig
from specchat.app.setup import run_setup
from specchat.cli.run import stderr_progress


def ask(question: str) -> bool:
    """A [Y/n] question on the terminal; Ctrl-D is no."""
    try:
        answer = input(f"{question} [Y/n] ")
    except EOFError:
        answer = "n"
    return answer.strip().lower() not in ("n", "no")


def setup_command(model: str, settings: RunConfig, yes: bool) -> None:
    run_setup(model, settings, stderr_progress, confirm=ask if sys.stdin.isatty() and not yes else None)
