"""The `specchat chat` terminal: prompt_toolkit for input, rich for output.  It only renders.

Interactive input: line editing, persistent history, Esc-Enter for a new line,
a block between two ``\"\"\"`` lines for pasted text, Tab completion of slash
commands.  Replies stream as markdown on a terminal, as plain text otherwise.
Ctrl-C during a reply stops it (the partial reply stays in the history);
Ctrl-C at the prompt asks for a second press (or Ctrl-D) to leave.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown

from specchat import ChatSession, DoneEvent, Notice, PrefillEvent, SpecchatError, TextEvent
from specchat.app.chat import ErrorLine
from specchat.cli.interrupts import INTERRUPTS
from specchat.cli.views import prefill_line

COMMANDS = ["/help", "/reset", "/system", "/set", "/stats", "/save", "/load", "/exit"]
BLOCK = '"""'


def status_line(stats) -> str:
    budget = "-" if stats.method == "ar" else str(stats.budget)
    return (
        f"{stats.new_tokens} tokens · {stats.tokens_per_s:.2f} tok/s · {stats.tokens_per_pass:.2f} tok/pass · "
        f"budget {budget} · {stats.target_passes} passes"
    )


class Repl:
    def __init__(
        self, session: ChatSession, console: Console, read_line: Callable[[], str], errors: Console | None = None
    ) -> None:
        self.session = session
        self.console = console
        self.errors = errors or console  # where error lines go (stderr, in the command)
        self.read_line = read_line  # raises EOFError at the end, KeyboardInterrupt on Ctrl-C

    def run(self) -> None:
        armed = False  # Ctrl-C pressed once at an empty prompt
        while True:
            try:
                text = self._read_message()
            except EOFError:
                return
            except KeyboardInterrupt:
                INTERRUPTS.handled()
                if armed:
                    return
                armed = True
                self.console.print("(press Ctrl-C again or Ctrl-D to leave)", style="dim", highlight=False)
                continue
            if not text.strip():
                continue
            armed = False
            if text.startswith("/"):
                lines, leave = self.session.command(text.strip())
                for line in lines:
                    (self.errors if isinstance(line, ErrorLine) else self.console).print(line, markup=False, highlight=False)
                if leave:
                    return
                continue
            self._reply(text)

    def _read_message(self) -> str:
        """One line, or a block from a line starting with BLOCK to a line ending with it."""
        first = self.read_line()
        stripped = first.strip()
        if not stripped.startswith(BLOCK):
            return first
        body = stripped[len(BLOCK):]
        if len(body) >= len(BLOCK) and body.endswith(BLOCK):
            return body[: -len(BLOCK)]
        lines = [body] if body else []
        while True:
            line = self.read_line()
            if line.rstrip().endswith(BLOCK):
                lines.append(line.rstrip()[: -len(BLOCK)])
                return "\n".join(lines).strip("\n")
            lines.append(line)

    def _reply(self, text: str) -> None:
        events = self.session.reply(text)
        try:
            if self.console.is_terminal:
                self._render_live(events)
            else:
                self._render_plain(events)
        except KeyboardInterrupt:
            INTERRUPTS.handled()
            events.close()
            self.console.print("\n(interrupted)", style="dim", highlight=False)
        except SpecchatError as exc:
            events.close()
            self.errors.print(exc.line(), markup=False, highlight=False)

    def _render_plain(self, events: Iterator) -> None:
        for event in events:
            if isinstance(event, PrefillEvent):
                self.errors.print(prefill_line(event), markup=False, highlight=False)
            elif isinstance(event, Notice):
                self.console.print(event.text, markup=False, highlight=False)
            elif isinstance(event, TextEvent):
                self.console.print(event.text, end="", markup=False, highlight=False, soft_wrap=True)
            elif isinstance(event, DoneEvent):
                self.console.print()
                self.console.print(status_line(event.stats), markup=False, highlight=False)

    def _render_live(self, events: Iterator) -> None:
        """Markdown that grows in place, one refresh per target pass (no timer, so no flicker)."""
        text, live, done = "", None, None
        try:
            for event in events:
                if isinstance(event, PrefillEvent):
                    self.errors.print(prefill_line(event), style="dim", highlight=False)
                elif isinstance(event, Notice):
                    self.console.print(event.text, style="dim")
                elif isinstance(event, TextEvent) and event.text:
                    text += event.text
                    if live is None:  # start only with content: an empty first frame leaves a stray line
                        live = Live(Markdown(text), console=self.console, auto_refresh=False, vertical_overflow="visible")
                        live.start()
                    live.update(Markdown(text), refresh=True)
                elif isinstance(event, DoneEvent):
                    done = event
        finally:
            if live is not None:
                live.stop()
        if done is not None:
            self.console.print(status_line(done.stats), style="dim", highlight=False)


def terminal_reader(history_file) -> Callable[[], str]:
    """prompt_toolkit input with history, Esc-Enter newlines and slash-command completion."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.completion import WordCompleter
    from prompt_toolkit.history import FileHistory
    from prompt_toolkit.key_binding import KeyBindings

    bindings = KeyBindings()

    @bindings.add("escape", "enter")
    def _newline(event) -> None:
        event.current_buffer.insert_text("\n")

    history_file.parent.mkdir(parents=True, exist_ok=True)
    prompt = PromptSession(
        history=FileHistory(str(history_file)),
        completer=WordCompleter(COMMANDS, sentence=True),
        key_bindings=bindings,
        multiline=False,
    )
    return lambda: prompt.prompt(">>> ")


def pipe_reader(stream: TextIO) -> Callable[[], str]:
    """One message per line from a non-terminal stdin."""

    def read() -> str:
        line = stream.readline()
        if line == "":
            raise EOFError
        return line.rstrip("\n")

    return read
