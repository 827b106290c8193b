"""Ctrl-C at any moment ends specchat with one line and exit status 130.

Python turns SIGINT into ``KeyboardInterrupt`` wherever the main thread is; inside an import
that may surface as another error (a half-imported module, a library re-raising as
``ModuleNotFoundError``).  :class:`Interrupts` remembers when the last Ctrl-C came, so that
the error boundary can tell an error caused by one from a real fault.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

EXIT_INTERRUPTED = 130
AFTERMATH_S = 2.0  # an unexpected error this soon after a Ctrl-C is taken as its doing


class Interrupts:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.last: float | None = None

    def install(self) -> None:
        signal.signal(signal.SIGINT, self.on_sigint)

    def on_sigint(self, signum, frame) -> None:
        self.last = self.clock()
        raise KeyboardInterrupt

    def caused(self, error: BaseException) -> bool:
        """Whether ``error`` is, or came from, a Ctrl-C."""
        if isinstance(error, KeyboardInterrupt):
            return True
        return self.last is not None and self.clock() - self.last < AFTERMATH_S


INTERRUPTS = Interrupts()  # the process's one SIGINT handler, installed by the console script
