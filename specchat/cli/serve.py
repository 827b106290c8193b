"""The `serve` command: check the listening address, load once, serve until Ctrl-C or SIGTERM."""

from __future__ import annotations

import importlib.util
import logging
import signal
import sys

from specchat import RunConfig, load
from specchat.cli.run import stderr_progress
from specchat.common.errors import ConfigError
from specchat.server.config import ServeConfig

SERVE_PACKAGES = ("starlette", "uvicorn", "sse_starlette", "pydantic")


def serve_command(settings: RunConfig, listen: ServeConfig) -> None:
    missing = [name for name in SERVE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"specchat serve needs {', '.join(missing)}, which are not installed", "pip install 'specchat[serve]'")
    from specchat.server.http import create_app
    from specchat.server.listen import bind_socket, server_for
    from specchat.server.service import ChatService

    sock = bind_socket(listen.host, listen.port)  # before minutes of loading, not after
    pipeline = load(settings, stderr_progress)
    stderr_progress(pipeline.draft_reason)
    service = ChatService(
        pipeline.engine, pipeline.encode_chat, pipeline.target_name, settings.generation(), listen.queue_size, settings.system,
        generate=pipeline.generate,  # each finished reply's speed counts for --draft auto, as in run and chat
    )
    _log_requests_to_stderr()
    host, port = sock.getsockname()[:2]
    stderr_progress(f"serving {pipeline.target_name} at http://{host}:{port}/v1 (OpenAI-compatible; Ctrl-C stops)")
    server = server_for(create_app(service, listen), service)
    server.run(sockets=[sock])
    stopped = f" ({signal.Signals(server.stopped_by).name})" if server.stopped_by else ""
    stderr_progress(f"stopped{stopped}")


def _log_requests_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("specchat.server")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
