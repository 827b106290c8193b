"""Where specchat keeps things (XDG base directories)."""

from __future__ import annotations

import os
from pathlib import Path


def _xdg(variable: str, fallback: str) -> Path:
    value = os.environ.get(variable)
    return Path(value) if value else Path.home() / fallback


def cache_dir() -> Path:
    """Assembled demo files, converted models and layer stores."""
    return _xdg("XDG_CACHE_HOME", ".cache") / "specchat"


def config_file() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config") / "specchat" / "config.toml"


def state_dir() -> Path:
    """Chat history and saved sessions."""
    return _xdg("XDG_STATE_HOME", ".local/state") / "specchat"
