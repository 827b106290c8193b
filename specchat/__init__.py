"""specchat: chat with a model larger than your memory, fast, through SpecExec speculative decoding.

The Python API the command line is built on::

    import specchat

    config = specchat.RunConfig(model="demo", max_new_tokens=64)
    pipeline = specchat.load(config, progress=print)      # resolve, place, load, pair a draft
    for event in specchat.stream_generate(pipeline, "Write a haiku about the sea"):
        if isinstance(event, specchat.TextEvent):
            print(event.text, end="", flush=True)
        elif isinstance(event, specchat.DoneEvent):
            print(f"\\n{event.stats.tokens_per_pass:.2f} tokens per target pass")

``build_config`` merges defaults < config file < ``SPECCHAT_*`` environment < explicit
values as the CLI does; ``pipeline.engine`` is the :class:`Engine`, whose ``generate``
takes token ids and a :class:`GenerationConfig`.  Library errors are
:class:`SpecchatError`\\ s carrying what went wrong and what to do.

Names load on first use, so ``import specchat`` stays cheap (no torch until needed).
"""

from __future__ import annotations

import os
from importlib import import_module

# oneDNN (torch's CPU matrix-product library) caches one compiled kernel per product shape, up to
# 1024 of them; every new prompt length and tree size is a new shape, so over a long chat the
# cache alone grows RSS by tens of MB.  64 kernels cost no measured speed (session 19's probe)
# and kept an hour's soak within 5% (session 20; docs/benchmarks.md).  Set here, before torch
# computes anything; a value the user exported wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")

__version__ = "0.1.0"

_EXPORTS = {
    # configuration
    "RunConfig": "specchat.app.config",
    "build_config": "specchat.app.config",
    "parse_size": "specchat.app.config",
    # a config -> a ready engine, and replies from it
    "load": "specchat.app.loader",
    "Pipeline": "specchat.app.loader",
    "stream_generate": "specchat.app.generate",
    "generate": "specchat.app.generate",
    "Engine": "specchat.engine.engine",
    "GenerationConfig": "specchat.engine.config",
    "EngineError": "specchat.engine.config",
    # the events the engine yields
    "Event": "specchat.engine.events",
    "TextEvent": "specchat.engine.events",
    "PrefillEvent": "specchat.engine.events",
    "DoneEvent": "specchat.engine.events",
    "GenerationStats": "specchat.engine.events",
    # a conversation
    "ChatSession": "specchat.app.chat",
    "Notice": "specchat.app.chat",
    "METHODS": "specchat.engine.config",
    "resolve_device": "specchat.model.placement",
    # where specchat keeps things
    "config_file": "specchat.common.paths",
    "cache_dir": "specchat.common.paths",
    "state_dir": "specchat.common.paths",
    # errors
    "SpecchatError": "specchat.common.errors",
    "ConfigError": "specchat.common.errors",
    "InputError": "specchat.common.errors",
    "ModelNotFound": "specchat.common.errors",
    "CorruptModel": "specchat.common.errors",
    "ResourceError": "specchat.common.errors",
}
_ALIASES = {"load": "load_pipeline"}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'specchat' has no attribute {name!r}")
    value = getattr(import_module(module), _ALIASES.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
