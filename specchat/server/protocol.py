"""OpenAI's chat-completions wire format: a request body in, a typed :class:`ChatRequest` (or one
:class:`RequestError` sentence) out, and the response, chunk and error bodies back.

Only what specchat can honour is accepted.  Fields a client may send that change nothing here
(``user``, ``metadata``, ``store``, ...) are ignored; fields that ask for something specchat does
not do (``n > 1``, tools, logprobs, penalties, JSON modes) are refused with a 400 naming the
field, never silently dropped.  Values are checked strictly: ``"0.5"`` is not a temperature.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from specchat.engine.events import GenerationStats

MAX_STOPS = 4  # as OpenAI's API
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "interrupted": "length"}


class RequestError(Exception):
    """A request the server refuses: the HTTP status, one sentence, the field and OpenAI's error code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str | None = None  # any name: the one loaded model answers (responses name it)
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def conversation(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them (``developer`` is OpenAI's newer name for ``system``)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise RequestError(400, f"stop takes up to {MAX_STOPS} non-empty strings", "stop")
        return tuple(stops)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


# What a client may ask for that specchat does not do: field -> (is it asked for?, why not).
_UNSUPPORTED = {
    "n": (lambda v: v not in (None, 1), "specchat returns one choice; send n = 1 or leave it out"),
    "tools": (bool, "specchat does not call tools"),
    "tool_choice": (lambda v: v not in (None, "none"), "specchat does not call tools"),
    "functions": (bool, "specchat does not call functions"),
    "function_call": (lambda v: v not in (None, "none"), "specchat does not call functions"),
    "logprobs": (bool, "specchat does not return log-probabilities"),
    "top_logprobs": (bool, "specchat does not return log-probabilities"),
    "logit_bias": (bool, "specchat does not bias logits"),
    "presence_penalty": (bool, "specchat applies no penalties; leave it out or send 0"),
    "frequency_penalty": (bool, "specchat applies no penalties; leave it out or send 0"),
    "response_format": (lambda v: not (isinstance(v, dict) and v.get("type") == "text"), "specchat produces plain text only"),
    "audio": (bool, "specchat produces text only"),
    "modalities": (lambda v: v not in (None, ["text"]), "specchat produces text only"),
    "prediction": (bool, "specchat does not take predicted outputs"),
}


def parse_chat_request(raw: bytes) -> ChatRequest:
    """The body of ``POST /v1/chat/completions``, checked; raises :class:`RequestError`."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    for name, (asked, why) in _UNSUPPORTED.items():
        if body.get(name) is not None and asked(body[name]):
            raise RequestError(400, f"{name} is not supported: {why}", name, "unsupported_parameter")
    _refuse_non_text_parts(body.get("messages"))
    try:
        return ChatRequest.model_validate(body)
    except ValidationError as exc:
        first = max(exc.errors(), key=lambda error: len(error["loc"]))  # in a union, the branch that got furthest
        where = _location(first["loc"])
        raise RequestError(400, f"invalid {where}: {first['msg'][0].lower()}{first['msg'][1:]}", where) from None


def _refuse_non_text_parts(messages: Any) -> None:
    """Images, audio and files in a message: refused by name (the model reads text only)."""
    for i, message in enumerate(messages if isinstance(messages, list) else []):
        parts = message.get("content") if isinstance(message, dict) else None
        for j, part in enumerate(parts if isinstance(parts, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                where = f"messages[{i}].content[{j}]"
                raise RequestError(400, f"{where} has type {kind!r}: specchat's models read text only", where, "unsupported_content")


def _location(loc: tuple) -> str:
    """('messages', 0, 'role') -> 'messages[0].role'; pydantic's union branch names are dropped."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in ("str", "list[TextPart]", "list[str]") or "[" in str(part):
            continue
        else:
            text += f".{part}" if text else str(part)
    return text or "body"


# -- responses --------------------------------------------------------------------------
@dataclass(frozen=True)
class Reply:
    """What every response of one completion shares."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, created: int, model: str) -> Reply:
        return cls(f"chatcmpl-{secrets.token_hex(12)}", created, model)

    def completion(self, text: str, stats: GenerationStats) -> dict:
        return {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": FINISH_REASONS[stats.finish_reason], "logprobs": None}],
            "usage": usage(stats),
            "specchat": run_stats(stats),
        }

    def chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        return {
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        }

    def final_chunk(self, stats: GenerationStats) -> dict:
        return self.chunk({}, FINISH_REASONS[stats.finish_reason]) | {"specchat": run_stats(stats)}

    def usage_chunk(self, stats: GenerationStats) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": usage(stats)}


def usage(stats: GenerationStats) -> dict:
    prompt = stats.prompt_tokens
    return {"prompt_tokens": prompt, "completion_tokens": stats.new_tokens, "total_tokens": prompt + stats.new_tokens}


def run_stats(stats: GenerationStats) -> dict[str, Any]:
    """specchat's own account of the run, beside OpenAI's fields."""
    return {
        "method": stats.method,
        "budget": stats.budget,
        "tokens_per_pass": round(stats.tokens_per_pass, 3),
        "target_passes": stats.target_passes,
        "tree_nodes": stats.tree_nodes,
        "prefill_tokens": stats.prefill_tokens,
        "prefill_s": round(stats.prefill_s, 4),
        "draft_s": round(stats.draft_s, 4),
        "target_s": round(stats.target_s, 4),
        "wall_s": round(stats.wall_s, 4),
        "tokens_per_s": round(stats.tokens_per_s, 3),
        "finish_reason": stats.finish_reason,
    }
