"""``specchat serve``: an OpenAI-compatible HTTP server over one loaded engine.

protocol (the wire format) -> service (the queue and the one worker that drives the engine)
-> http (the Starlette app) -> listen (the socket and the uvicorn server, stopped cleanly).
Needs the ``serve`` extra: starlette, uvicorn, sse-starlette, pydantic.
"""
