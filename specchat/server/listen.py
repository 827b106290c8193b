"""The server's socket, bound before the model loads (a taken port fails in a second, not after
minutes), and the uvicorn server that runs the app on it until Ctrl-C or SIGTERM."""

from __future__ import annotations

import contextlib
import errno
import socket

import uvicorn

from specchat.common.errors import InputError
from specchat.server.http import STOP_GRACE_S
from specchat.server.service import ChatService



def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (not yet listening: until the server starts, connecting
    is refused rather than left hanging); raises :class:`InputError` with what to change."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise InputError(f"cannot serve on host {host!r}: {exc.strerror}", "give --host an address of this machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may reuse a port in TIME_WAIT
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise InputError(*_bind_failure(host, port, exc)) from None
    return sock


def _bind_failure(host: str, port: int, exc: OSError) -> tuple[str, str]:
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is already in use", "stop what listens there or choose another --port"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{host} is not an address of this machine", "use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"no permission to listen on port {port}", "ports below 1024 need privileges; choose --port 8000 or another above 1023"
    return f"cannot listen on {host}:{port}: {exc.strerror}", "choose another --host or --port"


class Server(uvicorn.Server):
    """uvicorn's server, which also tells the service to stop at its next pass when a signal
    arrives, and which ends normally after a signal instead of raising it again."""

    def __init__(self, config: uvicorn.Config, service: ChatService) -> None:
        super().__init__(config)
        self.service = service
        self.stopped_by: int | None = None

    def handle_exit(self, sig, frame) -> None:
        self.stopped_by = sig
        self.service.stop()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            self._captured_signals.clear()  # (uvicorn re-raises what it caught; a stopped server is done)


def server_for(app, service: ChatService) -> Server:
    """The server of ``app``; ``server.run(sockets=[sock])`` serves until stopped (``stopped_by``:
    the signal, if one stopped it)."""
    return Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=STOP_GRACE_S + 1), service)
