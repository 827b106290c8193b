"""A chat session: the conversation, its settings, and turns through the engine.

The session is UI-free.  :meth:`ChatSession.reply` yields the engine's events
(plus :class:`Notice` lines, e.g. when old turns are dropped to fit the
context); :meth:`ChatSession.command` runs a slash command and returns the
lines to show.  The REPL in ``repl.py`` only renders.

KV reuse: every turn re-encodes the whole conversation through the chat
template and hands it to the engine, which keeps the longest common prefix of
what its caches hold, so a turn prefills only the new message and template glue.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from specchat.engine.config import METHODS, EngineError, GenerationConfig
from specchat.common.errors import InputError, ResourceError
from specchat.common.files import atomic_write
from specchat.engine.events import DoneEvent, Event, GenerationStats, TextEvent

SESSION_FORMAT = 1
SETTABLE = {"temperature": "temperature", "top_p": "top_p", "budget": "budget", "method": "method", "max_tokens": "max_new_tokens"}


@dataclass(frozen=True)
class Notice:
    text: str


class ErrorLine(str):
    """A line of a command's output that reports a failure (a terminal shows it on stderr)."""


@dataclass
class Totals:
    replies: int = 0
    new_tokens: int = 0
    passes: int = 0
    decode_s: float = 0.0
    prefill_tokens: int = 0

    def add(self, stats: GenerationStats) -> None:
        self.replies += 1
        self.new_tokens += stats.new_tokens
        self.passes += stats.target_passes
        self.decode_s += stats.wall_s - stats.prefill_s
        self.prefill_tokens += stats.prefill_tokens


@dataclass
class ChatSession:
    pipeline: object  # specchat.pipeline.Pipeline (or anything with engine, encode_chat, names)
    settings: GenerationConfig
    system: str | None = None
    messages: list[dict] = field(default_factory=list)  # user/assistant turns, no system
    last_stats: GenerationStats | None = None
    last_pass_sizes: list[int] = field(default_factory=list)
    totals: Totals = field(default_factory=Totals)

    # -- turns -------------------------------------------------------------------------
    def conversation(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": m["role"], "content": m["content"]} for m in self.messages]

    def reply(self, text: str) -> Iterator[Event | Notice]:
        """Send a user message; yield notices and engine events.  Closing early keeps the partial reply."""
        self.messages.append({"role": "user", "content": text})
        yield from self._fit_context()
        if self._needs_calibration():  # measured (and saved) here, not inside the reply's timing
            yield Notice("(measuring pass times for --budget auto, once for these settings)")
            self.pipeline.engine.tuner_for(self.settings)
        prompt_ids = self.pipeline.encode_chat(self.conversation())
        partial: list[str] = []
        self.last_pass_sizes = []
        finished = False
        try:
            events = self.pipeline.generate(prompt_ids, self.settings)
            try:
                first = next(events)  # the engine checks the request before it replies
            except EngineError as exc:
                finished = True  # nothing was said: forget the message rather than keep half a turn
                self.messages.pop()
                raise InputError(f"cannot reply: {exc}", "change the setting with /set; the conversation is kept") from exc
            for event in itertools.chain([first], events):
                if isinstance(event, TextEvent):
                    partial.append(event.text)
                    self.last_pass_sizes.append(len(event.token_ids))
                elif isinstance(event, DoneEvent):
                    finished = True
                    self.last_stats = event.stats
                    self.totals.add(event.stats)
                    self.messages.append({"role": "assistant", "content": event.text})
                yield event
        finally:
            if not finished:  # Ctrl-C, or the caller stopped reading
                self.messages.append({"role": "assistant", "content": "".join(partial), "interrupted": True})

    def _fit_context(self) -> Iterator[Notice]:
        """Drop the oldest turns (never the system prompt) until the prompt and a reply fit."""
        limit = self.pipeline.engine.target.max_context - self.settings.max_depth - 1
        reserve = min(self.settings.max_new_tokens, limit // 2)
        head = [{"role": "system", "content": self.system}] if self.system else []
        alone = head + [{"role": "user", "content": self.messages[-1]["content"]}]
        if len(self.pipeline.encode_chat(alone)) + reserve > limit:  # checked before dropping any history
            self.messages.pop()
            raise InputError(
                "the message is longer than the model's context", "send a shorter message; the conversation is kept"
            )
        dropped = 0
        while len(self.pipeline.encode_chat(self.conversation())) + reserve > limit:
            del self.messages[: 2 if self.messages[1]["role"] == "assistant" else 1]
            dropped += 1
        if dropped:
            yield Notice(f"(dropped the {dropped} oldest turn{'s' if dropped > 1 else ''} to fit the context)")

    def reset(self) -> None:
        self.messages.clear()
        self.pipeline.engine.reset()

    # -- slash commands -------------------------------------------------------------------
    def command(self, line: str) -> tuple[list[str], bool]:
        """Run ``/name args``; returns (lines to show, whether to leave)."""
        name, _, argument = line[1:].strip().partition(" ")
        argument = argument.strip()
        handler = getattr(self, f"_cmd_{name}", None)
        if handler is None:
            return [f"unknown command /{name}; /help lists them"], False
        try:
            return handler(argument)
        except InputError as exc:
            return [ErrorLine(exc.line())], False

    def _cmd_help(self, _: str):
        return [
            "/help                      this list",
            "/reset                     forget the conversation",
            "/system TEXT               set the system prompt (empty: none)",
            "/set NAME VALUE            temperature, top_p, budget, method, max_tokens",
            "/stats                     session totals and the last reply's passes",
            "/save [PATH]               save the conversation (JSON)",
            "/load PATH                 load a saved conversation",
            "/exit                      leave (Ctrl-D too)",
            'Multi-line input: Esc then Enter for a new line, or a block between """ lines.',
        ], False

    def _cmd_exit(self, _: str):
        return [], True

    _cmd_quit = _cmd_exit

    def _cmd_reset(self, _: str):
        self.reset()
        return ["conversation cleared"], False

    def _cmd_system(self, text: str):
        self.system = text or None
        return [f"system prompt {'set' if text else 'cleared'}"], False

    def _cmd_set(self, argument: str):
        name, _, value = argument.partition(" ")
        if name not in SETTABLE or not value.strip():
            return [f"usage: /set {{{'|'.join(SETTABLE)}}} VALUE"], False
        field_name = SETTABLE[name]
        if name == "budget" and value.strip() == "auto":
            self.settings = replace(self.settings, budget=None)
            return ["budget = auto"], False
        try:
            typed = value.strip() if field_name == "method" else (float(value) if field_name in ("temperature", "top_p") else int(value))
            if field_name == "method" and typed not in METHODS:
                raise ValueError(f"method must be one of {', '.join(METHODS)}")
            if typed == "specexec" or typed == "specinfer":
                if self.pipeline.engine.draft is None:
                    raise ValueError("this session has no draft model")
            self.settings = replace(self.settings, **{field_name: typed})
        except ValueError as exc:
            return [f"bad value for {name}: {exc}"], False
        return [f"{name} = {typed}"], False

    def _cmd_stats(self, _: str):
        t = self.totals
        lines = [
            f"session: {t.replies} replies, {t.new_tokens} tokens, {t.passes} target passes, "
            f"{t.new_tokens / max(t.passes, 1):.2f} tok/pass, {t.new_tokens / max(t.decode_s, 1e-9):.2f} tok/s",
            f"settings: method {self.settings.method}, budget {self._budget_text()}, temperature {self.settings.temperature:g}, "
            f"top_p {self.settings.top_p:g}, max_tokens {self.settings.max_new_tokens}",
            self._models_text(),
        ]
        if self.last_stats:
            s = self.last_stats
            lines.append(
                f"last reply: {s.new_tokens} tokens in {s.target_passes} passes, prefill {s.prefill_tokens} tokens, "
                f"tokens per pass: {' '.join(map(str, self.last_pass_sizes))}"
            )
        return lines, False

    def _models_text(self) -> str:
        pipeline = self.pipeline
        plan = pipeline.offload
        placement = (
            "resident" if plan.mode == "none"
            else f"offload {plan.mode}, {plan.resident_layers} of {pipeline.engine.target.num_layers} layers kept"
        )
        draft = (
            f"draft {pipeline.draft_name} ({pipeline.draft_bits}-bit, {pipeline.draft_bytes / 1e9:.2f} GB)"
            if pipeline.draft_name else "no draft"
        )
        return f"models: {pipeline.target_name} ({str(pipeline.compute_dtype).removeprefix('torch.')}, {placement}), {draft}"

    def _needs_calibration(self) -> bool:
        engine = self.pipeline.engine
        return self.settings.auto_budget and self.settings.method != "ar" and engine.costs.calibration is None

    def _budget_text(self) -> str:
        if not self.settings.auto_budget or self.settings.method == "ar":
            return str(self.settings.budget)
        if self._needs_calibration():
            return "auto (pass times are measured before the next reply)"
        return "auto: " + self.pipeline.engine.tuner_for(self.settings).explain()

    def _cmd_save(self, argument: str):
        from specchat.common.paths import state_dir

        path = Path(argument).expanduser() if argument else state_dir() / "sessions" / "last.json"
        if argument and not path.parent.is_dir():  # as a shell would: the folder must be there
            raise InputError(
                f"cannot save the session to {path}: the folder {path.parent} does not exist",
                "create it or choose another path; the conversation is still here",
            )
        save_session(self, path)
        return [f"saved to {path}"], False

    def _cmd_load(self, argument: str):
        if not argument:
            return ["usage: /load PATH"], False
        notes = load_session(self, Path(argument).expanduser())
        return [f"loaded {len(self.messages)} messages from {argument}", *notes], False


# -- sessions on disk ---------------------------------------------------------------------
def save_session(session: ChatSession, path: Path) -> None:
    """Atomic write (temp file + rename), mode 0600."""
    payload = {
        "format": SESSION_FORMAT,
        "target": session.pipeline.target_name,
        "draft": session.pipeline.draft_name,
        "system": session.system,
        "messages": session.messages,
        "settings": _saved_settings(session.settings),
    }
    try:
        _write_private(path, json.dumps(payload, indent=1))
    except (OSError, ResourceError) as exc:
        reason = exc.what if isinstance(exc, ResourceError) else exc.strerror or exc
        raise InputError(
            f"cannot save the session to {path}: {reason}", "choose another path; the conversation is still here"
        ) from exc


def _saved_settings(settings: GenerationConfig) -> dict:
    saved = {name: getattr(settings, f) for name, f in SETTABLE.items()}
    if settings.auto_budget:
        saved["budget"] = "auto"  # on disk; None in memory
    return saved


def _write_private(path: Path, text: str) -> None:
    """Atomic write, mode 0600: the old file stays whole until the new one is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text, mode=0o600)


def _loaded_settings(session: ChatSession, saved: dict, keep: frozenset[str]) -> GenerationConfig:
    """The session's settings with the saved ones applied, except those named in ``keep`` (set on
    the command line, which wins) and a method this chat cannot run."""
    settings = {SETTABLE[k]: v for k, v in saved.items() if k in SETTABLE and SETTABLE[k] not in keep}
    if settings.get("method", "ar") != "ar" and session.pipeline.engine.draft is None:
        del settings["method"]  # saved with a draft; this chat runs without one
    if settings.get("budget") == "auto":
        settings["budget"] = None
    return replace(session.settings, **settings)


def load_session(session: ChatSession, path: Path, keep: frozenset[str] = frozenset()) -> list[str]:
    """Replace the conversation with a saved one; the current one is kept if the file is bad.
    The saved settings apply except those in ``keep`` (generation setting names).  Returns
    notes to show: that it was saved with another model, which then continues it."""
    try:
        payload = json.loads(path.read_text())
        messages = payload["messages"]
        ok = payload.get("format") == SESSION_FORMAT and all(
            isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
            for m in messages
        )
        new_settings = _loaded_settings(session, payload.get("settings", {}), keep)
        system = payload.get("system")
        if not ok or not (system is None or isinstance(system, str)):
            raise ValueError("unexpected structure")
    except OSError as exc:
        raise InputError(f"cannot read session file {path}: {exc.strerror}", "check the path") from exc
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"session file {path} is not a valid specchat session ({exc})", "the current conversation is kept") from exc
    session.messages = list(messages)
    session.system = system
    session.settings = new_settings
    saved_with, running = payload.get("target"), session.pipeline.target_name
    if isinstance(saved_with, str) and saved_with != running:
        return [f"(saved with {saved_with}; {running} continues it: earlier replies are the other model's)"]
    return []
