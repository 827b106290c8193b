"""Errors a user can act on.  Each carries what went wrong, why, and what to do.

Library code raises these; only the command layer turns them into one line on
stderr and an exit status.
"""

from __future__ import annotations


class SpecchatError(Exception):
    exit_code = 2

    def __init__(self, what: str, fix: str = "") -> None:
        super().__init__(what)
        self.what = what
        self.fix = fix

    def line(self) -> str:
        return f"error: {self.what}" + (f"; {self.fix}" if self.fix else "")


class ModelNotFound(SpecchatError):
    pass


class IncompleteModel(ModelNotFound):
    """Part of the model is here (an interrupted download): setup resumes it."""


class CorruptModel(SpecchatError):
    pass


class ConfigError(SpecchatError):
    pass


class InputError(SpecchatError):
    pass


class ResourceError(SpecchatError):
    pass


def reason(exc: BaseException) -> str:
    """What went wrong, in a few words, for a warning that lets the run go on: a SpecchatError's
    ``what``, an OSError's ``strerror``, else the message."""
    return getattr(exc, "what", None) or getattr(exc, "strerror", None) or str(exc)
