"""A directory of per-layer tensor files made from a checkpoint: the self draft's low-bit layers.

Layout::

    building.json             while it is written: the checkpoint files it is made from
    layer_000.safetensors ... one per decoder layer, each written whole and then renamed
    manifest.json             last: what it holds, the checkpoint files, each layer file's CRC-32

A build interrupted by Ctrl-C, a kill or a full disk leaves whole layer files only; the next
build of the same checkpoint keeps them and writes the rest.  A directory made from other
weights (the model was re-converted in place), by another torch, or whose manifest says other
contents, is emptied and rebuilt; a layer file whose bytes do not match the manifest's CRC is
refused on load, never used.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch

from specchat.common.errors import CorruptModel
from specchat.common.files import atomic_write, check_free_disk
from specchat.weights.store import BUILDING, MANIFEST, clear_directory, source_files

FORMAT = 1


class LayerFiles:
    """``path``'s layer files of ``contents`` (a dict saying what they hold) made from ``model_dir``."""

    def __init__(self, path: Path, model_dir: Path, num_layers: int, contents: dict) -> None:
        self.path, self.num_layers = path, num_layers
        self.identity = {"format": FORMAT, "torch": torch.__version__, "contents": contents}
        self.sources = source_files(model_dir)
        self._crc32: list[int] | None = None

    def layer_file(self, index: int) -> Path:
        return self.path / f"layer_{index:03d}.safetensors"

    def complete(self) -> bool:
        """Whether a finished copy of these contents, made from these weights, is here."""
        try:
            manifest = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError):
            return False
        if {key: manifest.get(key) for key in self.identity} != self.identity or manifest.get("source_files") != self.sources:
            return False
        self._crc32 = manifest.get("crc32")
        return isinstance(self._crc32, list) and len(self._crc32) == self.num_layers

    def start(self, needed_bytes: int) -> None:
        """Make the directory ready to write: what an earlier build of these weights left is kept."""
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob("*.partial"):
            stale.unlink()
        if (self.path / MANIFEST).is_file() or self._building() not in (None, self._build_record()):
            clear_directory(self.path)  # a finished copy of something else, or a half-built one of other weights or contents
        existing = sum(f.stat().st_size for f in self.path.glob("layer_*.safetensors"))
        check_free_disk(self.path, needed_bytes - existing, "for the self draft", "free some space or choose another --store")
        atomic_write(self.path / BUILDING, json.dumps(self._build_record()))

    def _build_record(self) -> dict:
        """What a half-built copy records, so that only a build of the same contents from the same weights resumes it."""
        return self.identity | {"source_files": self.sources}

    def _building(self) -> dict | None:
        try:
            record = json.loads((self.path / BUILDING).read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else {}

    def has(self, index: int) -> bool:
        return self.layer_file(index).is_file()

    def write(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save

        atomic_write(self.layer_file(index), save({k: v.contiguous() for k, v in tensors.items()}))

    def read(self, index: int) -> dict[str, torch.Tensor]:
        """One layer's tensors; its CRC-32 is checked against the manifest when there is one."""
        from safetensors.torch import load

        file = self.layer_file(index)
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise CorruptModel(f"cannot read {file}: {exc.strerror}", f"delete {self.path} to rebuild it") from exc
        if self._crc32 is not None and zlib.crc32(data) != self._crc32[index]:
            raise CorruptModel(f"{file} is damaged (checksum mismatch)", f"delete {self.path} to rebuild it")
        try:
            return load(data)
        except Exception as exc:  # safetensors raises its own error types for a bad header
            raise CorruptModel(f"{file} is damaged ({exc})", f"delete {self.path} to rebuild it") from exc

    def finish(self) -> None:
        """Record every layer file's CRC-32 in the manifest (written last), so later loads check them."""
        self._crc32 = [zlib.crc32(self.layer_file(i).read_bytes()) for i in range(self.num_layers)]
        manifest = self.identity | {"num_layers": self.num_layers, "source_files": self.sources, "crc32": self._crc32}
        atomic_write(self.path / MANIFEST, json.dumps(manifest, indent=1))
        (self.path / BUILDING).unlink(missing_ok=True)
