"""Ctrl-C at any moment ends specchat with one line and exit status 130.

Python turns SIGINT into ``KeyboardInterrupt`` wherever the main thread is; inside an import
that may be swallowed (by code that catches everything) and surface later as another error: a
half-imported module, a library's ``ModuleNotFoundError``, and our own "cannot load the
weights" on top of it.  :class:`Interrupts` remembers a Ctrl-C that nobody has handled yet,
so that the error boundary can tell an error caused by one from a real fault.  Code that
handles a Ctrl-C itself (the chat REPL stopping a reply) says so with :meth:`handled`.
"""

from __future__ import annotations

import signal

EXIT_INTERRUPTED = 130


class Interrupts:
    def __init__(self) -> None:
        self.pending = False  # a Ctrl-C came and no one has handled it

    def install(self) -> None:
        signal.signal(signal.SIGINT, self.on_sigint)

    def on_sigint(self, signum, frame) -> None:
        self.pending = True
        raise KeyboardInterrupt

    def handled(self) -> None:
        self.pending = False

    def caused(self, error: BaseException) -> bool:
        """Whether ``error`` is, or came from, a Ctrl-C."""
        return isinstance(error, KeyboardInterrupt) or self.pending


INTERRUPTS = Interrupts()  # the process's one SIGINT handler, installed by the console script
