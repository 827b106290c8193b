"""One loaded engine serving chat completions one at a time, in arrival order.

Requests become :class:`Job`\\ s in a bounded FIFO queue; a single worker (a task on the server's
event loop) takes them in turn and drives the engine's generator in a thread, one target pass
per step, passing each event to the job's own queue.  Only the worker touches the engine, so
its caches see one conversation at a time; each job hands the engine the whole conversation,
and the engine keeps the longest common prefix it has cached (a request that extends the
previous conversation prefills only what is new).

Between passes the worker checks whether the job's client has gone (:meth:`Job.abandon`) or
the server is stopping; either closes the generator there, which leaves both caches
consistent (the engine repairs them on close), and the worker takes the next job.

A job's queue carries, in order: :data:`STARTED` once the request passed the engine's checks,
the engine's events, at most one exception (a refusal or a failure), then :data:`FINISHED`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import anyio

from specchat.engine.config import EngineError, GenerationConfig
from specchat.engine.engine import Engine
from specchat.engine.events import Event, TextEvent
from specchat.server.protocol import ChatRequest, RequestError

log = logging.getLogger("specchat.server")

STARTED = "started"  # the request passed the engine's checks; its events follow
FINISHED = "finished"  # nothing follows


class Busy(RequestError):
    def __init__(self, waiting: int) -> None:
        super().__init__(
            429, f"the server is busy: {waiting} requests are already waiting; retry later",
            code="rate_limit_exceeded", kind="rate_limit_error",
        )


class Stopping(RequestError):
    def __init__(self) -> None:
        super().__init__(503, "the server is shutting down", kind="server_error", code="server_shutting_down")


@dataclass
class Job:
    """One chat completion: its conversation and settings, and what the worker has sent back."""

    messages: list[dict[str, str]]
    config: GenerationConfig
    label: str = "request"
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    abandoned: bool = False  # set on the event loop when the client is gone

    def abandon(self) -> None:
        self.abandoned = True

    async def next(self) -> Event | str:
        """The next item the worker sent; a refusal or failure is raised here."""
        item = await self.events.get()
        if isinstance(item, BaseException):
            raise item
        return item


class ChatService:
    def __init__(
        self, engine: Engine, encode: Callable[[list[dict[str, str]]], Sequence[int]], model: str,
        defaults: GenerationConfig, queue_size: int = 8, system: str | None = None,
        generate: Callable[[Sequence[int], GenerationConfig], Iterator[Event]] | None = None,
    ) -> None:
        self.engine = engine
        # a reply's events: the engine's own, or a pipeline's, which also records the draft's speed
        self.generate = generate or engine.generate
        self.encode = encode  # messages -> prompt ids, through the model's chat template
        self.model = model  # the name responses carry
        self.defaults = defaults  # what a request that sets nothing gets (the command line's settings)
        self.system = system  # the system prompt of a conversation that brings none
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=queue_size)
        self.running: Job | None = None
        self._stopping = threading.Event()

    # -- the request side (event loop) ------------------------------------------------------
    def job_for(self, request: ChatRequest, label: str = "request") -> Job:
        """The request's job, with its settings over the server's; raises :class:`RequestError`."""
        settings = {
            "temperature": request.temperature, "top_p": request.top_p, "seed": request.seed,
            "max_new_tokens": request.token_limit,
        }
        try:
            config = replace(self.defaults, stop=request.stops(), **{k: v for k, v in settings.items() if v is not None})
        except ValueError as exc:
            raise RequestError(400, f"invalid setting: {exc}") from None
        messages = request.conversation()
        if self.system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system}, *messages]
        return Job(messages, config, label)

    def submit(self, job: Job) -> None:
        if self._stopping.is_set():
            raise Stopping()
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise Busy(self.queue.qsize()) from None

    def stop(self) -> None:
        """Stop at the next pass and refuse what waits (safe from a signal handler or any thread)."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # -- the worker ------------------------------------------------------------------------
    async def work(self) -> None:
        """Serve jobs in arrival order until cancelled."""
        while True:
            job = await self.queue.get()
            self.running = job
            try:
                await self._serve(job)
            finally:
                self.running = None
                job.events.put_nowait(FINISHED)

    async def _serve(self, job: Job) -> None:
        if job.abandoned:
            return
        if self.stopping:
            job.events.put_nowait(Stopping())
            return
        try:
            events = await anyio.to_thread.run_sync(self._open, job)
        except RequestError as exc:
            job.events.put_nowait(exc)
            return
        job.events.put_nowait(STARTED)
        tokens = 0
        try:
            while True:
                if job.abandoned:
                    log.info("%s: the client left after %d token%s; stopped there", job.label, tokens, "" if tokens == 1 else "s")
                    return
                if self.stopping:
                    job.events.put_nowait(Stopping())
                    return
                event = await anyio.to_thread.run_sync(next, events, None)
                if event is None:
                    return
                if isinstance(event, TextEvent):
                    tokens += len(event.token_ids)
                job.events.put_nowait(event)
        except Exception as exc:  # a failure inside the engine: this request fails, the server goes on
            log.error("%s failed: %s", job.label, exc)
            job.events.put_nowait(exc)
        finally:
            events.close()  # the engine repairs its caches here

    def _open(self, job: Job):
        """In the worker's thread: the conversation's ids, checked by the engine, and its reply generator."""
        prompt_ids = self.encode(job.messages)
        try:
            self.engine.check_request(prompt_ids, job.config)
        except EngineError as exc:
            context = "context" in str(exc)
            raise RequestError(400, f"cannot reply: {exc}", "messages", "context_length_exceeded" if context else None) from None
        return self.generate(prompt_ids, job.config)
