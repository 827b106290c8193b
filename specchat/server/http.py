"""The HTTP face of a :class:`ChatService`: OpenAI's ``/v1/chat/completions`` and ``/v1/models``,
and ``/health``, as a Starlette app (uvicorn serves it; sse-starlette frames the streams).

Every refusal is OpenAI's error object with one sentence and a 4xx status; a failure inside
the engine is a 500 with one sentence (logged on the server's side); the server goes on.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from specchat.engine.events import DoneEvent, TextEvent
from specchat.server.config import ServeConfig
from specchat.server.protocol import Reply, RequestError, error_body, parse_chat_request
from specchat.server.service import FINISHED, STARTED, ChatService, Job, Stopping

log = logging.getLogger("specchat.server")

DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there
STOP_GRACE_S = 4.0  # on a stop, how long a stream has to end with its error line before it is cut


def create_app(service: ChatService, settings: ServeConfig, clock: Callable[[], float] = time.time) -> Starlette:
    api = _Api(service, settings, clock)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        worker = asyncio.create_task(service.work())
        try:
            yield
        finally:
            service.stop()
            worker.cancel()

    return Starlette(
        routes=[
            Route("/v1/chat/completions", _answered(api.chat_completions), methods=["POST"]),
            Route("/v1/models", _answered(api.models), methods=["GET"]),
            Route("/health", api.health, methods=["GET"]),
        ],
        exception_handlers={HTTPException: _http_error},
        lifespan=lifespan,
    )


class _Api:
    """The endpoints over one service."""

    def __init__(self, service: ChatService, settings: ServeConfig, clock: Callable[[], float]) -> None:
        self.service, self.settings, self.clock = service, settings, clock
        self.started = int(clock())

    async def chat_completions(self, request: Request):
        _authorize(request, self.settings.api_key)
        chat = parse_chat_request(await _body(request, self.settings.max_body_bytes))
        job = self.service.job_for(chat, f"{request.client.host if request.client else '-'} chat completion")
        self.service.submit(job)
        if await _next(job, request) is not STARTED:
            return _gone(job)
        reply = Reply.new(int(self.clock()), self.service.model)
        if chat.stream:
            return EventSourceResponse(_chunks(job, reply, chat.include_usage), ping=15, shutdown_grace_period=STOP_GRACE_S)
        done = None
        while (item := await _next(job, request)) is not FINISHED:
            if item is None:
                return _gone(job)
            if isinstance(item, DoneEvent):
                done = item
        if done is None:  # (the worker always sends the reply or raises; this keeps a bug from a bare 500)
            raise Stopping()
        _log_done(job, done)
        return JSONResponse(reply.completion(done.text, done.stats))

    async def models(self, request: Request):
        _authorize(request, self.settings.api_key)
        model = {"id": self.service.model, "object": "model", "created": self.started, "owned_by": "specchat"}
        return JSONResponse({"object": "list", "data": [model]})

    async def health(self, request: Request):
        service = self.service
        return JSONResponse({
            "status": "stopping" if service.stopping else "ok", "model": service.model,
            "busy": service.running is not None, "waiting": service.queue.qsize(),
        })


def _gone(job: Job) -> JSONResponse:
    """The client left while its request waited: stop it; nobody reads this answer."""
    job.abandon()
    return JSONResponse({}, status_code=499)


async def _chunks(job: Job, reply: Reply, include_usage: bool) -> AsyncIterator[str]:
    """The stream's ``data:`` payloads: the role, a delta per target pass, the finish, maybe the
    usage, then ``[DONE]``.  A failure mid-stream is OpenAI's error object, and the stream ends."""
    try:
        yield json.dumps(reply.chunk({"role": "assistant", "content": ""}))
        while (item := await job.next()) is not FINISHED:
            if isinstance(item, TextEvent) and item.text:
                yield json.dumps(reply.chunk({"content": item.text}))
            elif isinstance(item, DoneEvent):
                _log_done(job, item)
                yield json.dumps(reply.final_chunk(item.stats))
                if include_usage:
                    yield json.dumps(reply.usage_chunk(item.stats))
        yield "[DONE]"
    except RequestError as exc:
        yield json.dumps(exc.body())
    except Exception as exc:
        yield json.dumps(error_body(_failure_line(exc), "server_error"))
    finally:
        job.abandon()  # the client went away (this generator was cancelled) or the reply is complete


async def _next(job: Job, request: Request):
    """The job's next item, or None if the client disconnected while waiting for it."""
    item = asyncio.ensure_future(job.next())
    while True:
        done, _ = await asyncio.wait({item}, timeout=DISCONNECT_POLL_S)
        if done:
            return item.result()
        if await request.is_disconnected():
            item.cancel()  # (a cancelled wait on a queue takes nothing from it)
            return None


def _authorize(request: Request, key: str | None) -> None:
    if key is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
        what = "no API key was given" if not given else "the API key is not the server's"
        raise RequestError(401, f"{what}; send Authorization: Bearer <key> with the key given to specchat serve",
                           code="invalid_api_key")


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the request body is larger than the server's limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"the request body is larger than the server's limit of {limit} bytes")
    return bytes(body)


def _log_done(job: Job, done: DoneEvent) -> None:
    s = done.stats
    log.info("%s: %d tokens (%s), %.2f tokens/pass, %.1f tokens/s, prefill %d of %d prompt tokens",
             job.label, s.new_tokens, s.finish_reason, s.tokens_per_pass, s.tokens_per_s, s.prefill_tokens, s.prompt_tokens)


def _answered(endpoint):
    """Refusals become their 4xx and failures a 500, each OpenAI's error object with one sentence."""

    @functools.wraps(endpoint)
    async def answer(request: Request):
        try:
            return await endpoint(request)
        except RequestError as exc:
            log.info("%s %s: %d %s", request.method, request.url.path, exc.status, exc.message)
            return JSONResponse(exc.body(), status_code=exc.status)
        except Exception as exc:  # a bug or a failure inside the engine: one line each side, the server goes on
            line = _failure_line(exc)
            log.error("%s %s: 500 %s", request.method, request.url.path, line)
            return JSONResponse(error_body(line, "server_error"), status_code=500)

    return answer


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    message = {404: f"no such endpoint: {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return JSONResponse(error_body(message.get(exc.status_code, exc.detail)), status_code=exc.status_code)


def _failure_line(exc: Exception) -> str:
    return f"the server failed to reply: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
