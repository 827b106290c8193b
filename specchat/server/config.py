"""How ``specchat serve`` listens and whom it answers (the model's settings are the RunConfig's).
No web packages are imported here, so the command line can check these before it needs them."""

from __future__ import annotations

from dataclasses import dataclass

from specchat.common.errors import ConfigError


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port
    api_key: str | None = None  # when set, requests must carry ``Authorization: Bearer <key>``
    queue_size: int = 8  # requests that may wait while one is served; more get a 429
    max_body_bytes: int = 4 * 2**20

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be from 0 to 65535, got {self.port}", "0 takes any free port")
        if self.queue_size < 0:
            raise ConfigError(f"--queue-size must be 0 or more, got {self.queue_size}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key (or SPECCHAT_API_KEY) is empty", "give a key or leave it out")
