"""The `chat` command: load once, optionally resume a saved session, then hand over to the REPL."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console

from specchat import ChatSession, InputError, RunConfig, load, state_dir
from specchat.app.chat import load_session
from specchat.cli.run import stderr_progress
from specchat.cli.repl import Repl, pipe_reader, terminal_reader


def _load(settings: RunConfig):
    """Load once, with a spinner and the current step on a terminal's stderr."""
    err = Console(stderr=True)
    if not err.is_terminal:
        return load(settings, stderr_progress)
    with err.status("loading") as status:

        def progress(message: str) -> None:
            err.print(message, style="dim", highlight=False)
            status.update(message)

        return load(settings, progress)


def run_chat(settings: RunConfig, resume: Path | None, given: frozenset[str] = frozenset()) -> None:
    """``given``: the settings named on the command line, which win over a resumed session's."""
    if resume is not None and not resume.is_file():  # before minutes of loading, not after
        raise InputError(f"session file {resume} does not exist", "give the path that /save printed")
    pipeline = _load(settings)
    stderr_progress(pipeline.draft_reason)
    session = ChatSession(pipeline, settings.generation(), system=settings.system)
    if resume is not None:
        notes = load_session(session, resume, keep=frozenset(generation_names(given)))
        stderr_progress(f"resumed {len(session.messages)} messages from {resume}")
        for note in notes:
            stderr_progress(note)
    if sys.stdin.isatty():
        console = Console()
        console.print(f"specchat chat with {pipeline.target_name}; /help for commands, Ctrl-D to leave", style="dim")
        reader = terminal_reader(state_dir() / "history")
    else:
        console = Console(file=sys.stdout, force_terminal=False, no_color=True, soft_wrap=True)
        reader = pipe_reader(sys.stdin)
    Repl(session, console, reader, Console(stderr=True, highlight=False, soft_wrap=True)).run()


def generation_names(options: frozenset[str]) -> set[str]:
    """The generation settings among these RunConfig names (both spell them alike)."""
    from dataclasses import fields

    from specchat import GenerationConfig

    return set(options) & {f.name for f in fields(GenerationConfig)}
