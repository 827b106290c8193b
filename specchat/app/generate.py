"""One reply from a loaded pipeline, as events or as text: what the Python API offers."""

from __future__ import annotations

from collections.abc import Iterator

from specchat.app.loader import Pipeline
from specchat.engine.config import GenerationConfig
from specchat.engine.events import DoneEvent, Event

Messages = list[dict[str, str]]


def stream_generate(pipeline: Pipeline, prompt: str | Messages, config: GenerationConfig | None = None) -> Iterator[Event]:
    """The reply to ``prompt`` (a user message, or a whole conversation of role/content dicts) through
    the model's chat template: a :class:`TextEvent` per target pass, then a :class:`DoneEvent`.
    ``config`` defaults to the settings the pipeline was loaded with."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if config is None:
        config = pipeline.config.generation() if pipeline.config is not None else GenerationConfig()
    yield from pipeline.generate(pipeline.encode_chat(messages), config)


def generate(pipeline: Pipeline, prompt: str | Messages, config: GenerationConfig | None = None) -> str:
    """The whole reply's text (see :func:`stream_generate`)."""
    done = [event for event in stream_generate(pipeline, prompt, config) if isinstance(event, DoneEvent)]
    return done[-1].text
