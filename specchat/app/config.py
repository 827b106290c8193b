"""One frozen, validated run configuration, built at the edge from defaults < config file < env < flags.

Config file: TOML at ``$XDG_CONFIG_HOME/specchat/config.toml`` (or ``--config``),
keys as the long flag names with underscores (``max_new_tokens = 256``).
Environment: ``SPECCHAT_<KEY>`` (``SPECCHAT_TEMPERATURE=0.6``).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from specchat.engine.config import METHODS, GenerationConfig
from specchat.common.errors import ConfigError
from specchat.model.selfdraft import self_draft_kind
from specchat.weights.precision import DTYPE_CHOICES

QUANTS = ("auto", "16bit", "4bit")
DRAFT_QUANTS = ("int8", "none")
OFFLOADS = ("auto", "none", "ram", "ssd")  # on a CPU, "ram" means resident, like "none"
DEVICES = ("auto", "cpu", "cuda")  # auto: the first CUDA GPU torch sees, else the CPU

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str) -> int:
    """'512MB' -> 512_000_000, '4GiB' -> 4 * 2**30, '1000' -> 1000 bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size such as 512MB or 4GB")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    if "i" in unit:
        factor = 1024 ** ("kmgt".index(unit[0]) + 1)
    else:
        factor = _UNITS[unit.rstrip("b") if unit != "b" else "b"]
    return int(number * factor)


@dataclass(frozen=True)
class RunConfig:
    model: str = "demo"  # registry name, hub id, directory or .gguf
    draft: str = "auto"  # registry name, hub id, path, "self[:int8|int4]", "auto" or "none"
    quant: str = "auto"  # precision of the target's weights
    draft_quant: str = "int8"  # the draft's weights on a CPU: dynamic int8, or as stored
    device: str = "auto"  # where the draft and the target's layers compute
    dtype: str = "auto"  # what the target computes in (auto: bf16 on a GPU or a CPU with bf16 units, else fp32)
    offload: str = "auto"  # where the target's layers live
    ram_budget: int | None = None  # bytes of RAM resident layers may use
    store: Path | None = None  # layer store directory
    method: str = "specexec"
    budget: int | None = None  # tree nodes per target pass; None = auto (tuned from measurements)
    max_depth: int = 32
    draft_batch: int | None = None  # nodes per draft step; None = auto (chosen per step from calibrated costs, else 8)
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 512
    system: str | None = None

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("quant", self.quant, QUANTS)
        _choice("offload", self.offload, OFFLOADS)
        _choice("draft_quant", self.draft_quant, DRAFT_QUANTS)
        _choice("device", self.device, DEVICES)
        _choice("dtype", self.dtype, DTYPE_CHOICES)
        try:
            self_draft_kind(self.draft)
        except ValueError as exc:
            raise ConfigError(f"--draft: {exc}", "use --draft self (int8) or --draft self:int4") from exc
        if self.ram_budget is not None and self.ram_budget <= 0:
            raise ConfigError(f"--ram-budget must be positive, got {self.ram_budget}")
        try:
            self.generation()
        except ValueError as exc:
            raise ConfigError(f"invalid setting: {exc}", "see `specchat run --help`") from exc

    def generation(self) -> GenerationConfig:
        """The engine's settings (with ``--budget auto`` the cost model picks each pass's budget)."""
        return GenerationConfig(
            method="ar" if self.draft == "none" else self.method,  # no draft: plain decoding
            budget=self.budget,
            max_depth=self.max_depth,
            draft_batch=self.draft_batch,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            max_new_tokens=self.max_new_tokens,
        )


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {value!r}")


_FIELDS = {f.name: f for f in fields(RunConfig)}


def _coerce(name: str, value: Any, origin: str) -> Any:
    """Convert a raw value from a file, env var or flag to the field's type."""
    if value is None:
        return None
    kind = _FIELDS[name].type
    try:
        if name == "ram_budget":
            return value if isinstance(value, int) else parse_size(value)
        if name == "store":
            return Path(value).expanduser()
        if name in ("budget", "draft_batch") and str(value).strip().lower() == "auto":
            return None
        if "int" in kind and "float" not in kind:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"{value!r} is not a whole number")
            return int(value)
        if "float" in kind:
            return float(value)
        return str(value)
    except ValueError as exc:
        raise ConfigError(f"{origin}: bad value for {name}: {exc}") from exc


def read_config_file(path: Path, explicit: bool, named_by: str = "--config") -> dict[str, Any]:
    """The settings in the TOML file at ``path``; ``explicit``: the user named it (``named_by``
    says where), so a missing file is an error rather than no settings."""
    if path.is_dir():
        raise ConfigError(f"config file {path} (from {named_by}) is a directory", f"give {named_by} the path of a .toml file")
    if not path.is_file():
        if explicit:
            raise ConfigError(f"config file {path} does not exist", f"check the {named_by} path")
        return {}
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}", f"check its permissions or the {named_by} path") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}", "fix or delete it") from exc
    values = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in _FIELDS:
            line = next((i for i, l in enumerate(text.splitlines(), 1) if l.strip().startswith(key)), "?")
            known = ", ".join(sorted(_FIELDS))
            raise ConfigError(f"config file {path}, line {line}: unknown key {key!r}", f"known keys: {known}")
        values[name] = _coerce(name, value, f"config file {path}")
    return values


def read_environment(environ: dict[str, str]) -> dict[str, Any]:
    values = {}
    for name in _FIELDS:
        variable = f"SPECCHAT_{name.upper()}"
        if variable in environ and environ[variable] != "":
            values[name] = _coerce(name, environ[variable], f"environment variable {variable}")
    return values


def build_config(
    flags: dict[str, Any],
    config_path: Path | None,
    default_path: Path,
    environ: dict[str, str] | None = None,
    use_file: bool = True,
) -> RunConfig:
    """Merge defaults < config file (unless ``use_file`` is False) < environment < flags (None flags are absent)."""
    environ = dict(os.environ) if environ is None else environ
    path = config_path or Path(environ.get("SPECCHAT_CONFIG") or default_path)
    named_by = "--config" if config_path else "SPECCHAT_CONFIG" if environ.get("SPECCHAT_CONFIG") else "XDG_CONFIG_HOME"
    merged: dict[str, Any] = {}
    if use_file:
        merged.update(read_config_file(path, explicit=named_by != "XDG_CONFIG_HOME", named_by=named_by))
    merged.update(read_environment(environ))
    merged.update({k: _coerce(k, v, "command line") for k, v in flags.items() if v is not None})
    return replace(RunConfig(), **merged) if merged else RunConfig()
