"""The model registry, read from models.toml (format: docs/models.md)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from specchat.common.errors import ConfigError

REGISTRY_FILE = Path(__file__).resolve().parents[1] / "models.toml"
DEMO_ALIAS = "demo"
DEMO_TARGET = "demo-1.5b"


@dataclass(frozen=True)
class PartsSpec:
    """A model file split across pinned registry packages, concatenated in order."""

    package: str  # distribution name template, "{n}" = 1..count
    version: str
    count: int
    file: str  # path inside each package's module directory, "{n:02d}" allowed
    bytes: int
    sha256: str

    def distribution(self, n: int) -> str:
        return self.package.format(n=n)

    def module(self, n: int) -> str:
        return self.distribution(n).replace("-", "_")

    def relative_file(self, n: int) -> str:
        return self.file.format(n=n)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    role: str  # "target" | "draft" | "both"
    family: str
    params_b: float
    hub: str | None = None
    parts: PartsSpec | None = None
    drafts: tuple[str, ...] = ()
    description: str = ""

    def bytes_at(self, bits: int) -> int:
        return int(self.params_b * 1e9 * bits / 8)


_ROLES = ("target", "draft", "both")


def load_registry(path: Path = REGISTRY_FILE) -> dict[str, ModelEntry]:
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read the model registry {path}: {exc}") from exc
    entries: dict[str, ModelEntry] = {}
    for name, fields in raw.get("models", {}).items():
        try:
            parts = PartsSpec(**fields["parts"]) if "parts" in fields else None
            entry = ModelEntry(
                name=name,
                role=fields["role"],
                family=fields["family"],
                params_b=float(fields["params_b"]),
                hub=fields.get("hub"),
                parts=parts,
                drafts=tuple(fields.get("drafts", ())),
                description=fields.get("description", ""),
            )
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: model {name!r} is malformed ({exc})") from exc
        if entry.role not in _ROLES or not (entry.hub or entry.parts):
            raise ConfigError(f"{path}: model {name!r} needs a role in {_ROLES} and a hub id or parts")
        entries[name] = entry
    for entry in entries.values():
        for draft in entry.drafts:
            if draft not in entries:
                raise ConfigError(f"{path}: model {entry.name!r} names unknown draft {draft!r}")
    return entries
