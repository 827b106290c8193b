"""The layer store: each decoder layer's weights in one file, one sequential read per layer.

Layout of a store directory::

    manifest.json          written last; a directory without it is half-built
    resident.safetensors   embeddings, final norm, LM head (stay in memory)
    layer_000.bin ...      one per decoder layer: the layer's tensors back to back,
                           each starting on a 4 KiB boundary, the file padded to
                           4 KiB so it can be read with O_DIRECT in one request

Every layer of a model has the same tensors with the same shapes, so one
``layout`` (name, dtype, shape, offset) in the manifest serves all layer files.
A 4-bit store (dtype ``nf4``) keeps each 2-D weight as NF4 packed bytes followed
by its float32 block absmax (see :mod:`specchat.quant4`), so streaming moves
4.5 bits per weight; norms, biases and the resident tensors stay 16-bit.
A layer file is written as ``.partial`` and renamed once complete, so a build
interrupted by Ctrl-C or a full disk resumes from the first missing layer and
never trusts a half-written one.  Each layer's CRC-32 is in the manifest and is
checked on the first read of the layer in a process.

A store remembers the weight files it was built from (name, size, mtime):
``building.json`` while it is written, the manifest once done.  A store, or a
half-built one, of other weights (the model was re-downloaded or re-converted
in place) is rebuilt rather than reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from specchat.common.errors import CorruptModel
from specchat.common.files import atomic_write, check_free_disk
from specchat.weights.quant4 import absmax_offset, nf4_bytes, quantizable, quantize_nf4

ALIGN = 4096
FORMAT = 1
MANIFEST = "manifest.json"
BUILDING = "building.json"
RESIDENT = "resident.safetensors"
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
STORE_DTYPES = (*TORCH_DTYPES, "nf4")


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class TensorSlot:
    name: str  # relative to the layer, e.g. "self_attn.q_proj.weight"
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Store:
    path: Path
    num_layers: int
    dtype: str  # storage dtype of the layer tensors: a 16/32-bit float, or "nf4" (4-bit weights)
    layer_bytes: int  # size of every layer file (padded)
    layout: tuple[TensorSlot, ...]
    crc32: tuple[int, ...]

    def layer_file(self, index: int) -> Path:
        return self.path / f"layer_{index:03d}.bin"


def store_layout(
    shapes: list[tuple[str, tuple[int, ...]]] | tuple[tuple[str, tuple[int, ...]], ...], dtype: str, dense_dtype: str
) -> tuple[tuple[TensorSlot, ...], int]:
    """(layout, bytes of one layer file) for a layer of these tensors (name within the layer, shape)
    kept as ``dtype``; with ``nf4`` the tensors that stay 16-bit use ``dense_dtype``.  The file's
    size is known before any weight is read, so placement can plan with it."""
    four_bit = dtype == "nf4"
    dense = dense_dtype if four_bit else dtype
    width = torch.finfo(TORCH_DTYPES[dense]).bits // 8
    layout, offset = [], 0
    for name, shape in sorted(shapes):
        if four_bit and quantizable(name, shape):
            slot_dtype, nbytes = "nf4", nf4_bytes(shape)
        else:
            slot_dtype, nbytes = dense, torch.Size(shape).numel() * width
        layout.append(TensorSlot(name, slot_dtype, tuple(shape), offset, nbytes))
        offset = _align(offset + nbytes)
    return tuple(layout), _align(offset)


def store_dir_for(root: Path, model_dir: Path, dtype: str) -> Path:
    key = hashlib.sha1(str(model_dir.resolve()).encode()).hexdigest()[:10]
    return root / f"{model_dir.name}-{key}-{dtype}"


def open_store(path: Path) -> Store:
    """Load a complete store's manifest and check its files; a clear error otherwise."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CorruptModel(f"layer store {path} is incomplete (no manifest)", "rebuild it with `specchat setup`")
    try:
        raw = json.loads(manifest_path.read_text())
        store = Store(
            path=path,
            num_layers=raw["num_layers"],
            dtype=raw["dtype"],
            layer_bytes=raw["layer_bytes"],
            layout=tuple(TensorSlot(s["name"], s["dtype"], tuple(s["shape"]), s["offset"], s["nbytes"]) for s in raw["layout"]),
            crc32=tuple(raw["crc32"]),
        )
        if raw.get("format") != FORMAT:
            raise ValueError(f"format {raw.get('format')} != {FORMAT}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptModel(f"layer store manifest {manifest_path} is damaged ({exc})", f"delete {path} and rebuild") from exc
    if not (path / RESIDENT).is_file():
        raise CorruptModel(f"layer store {path} lacks {RESIDENT}", f"delete {path} and rebuild")
    for index in range(store.num_layers):
        file = store.layer_file(index)
        size = file.stat().st_size if file.is_file() else -1
        if size != store.layer_bytes:
            raise CorruptModel(
                f"layer store file {file} is {'missing' if size < 0 else f'truncated ({size} of {store.layer_bytes} bytes)'}",
                f"delete {path} and rebuild it with `specchat setup`",
            )
    return store


def build_store(
    model_dir: Path,
    path: Path,
    dtype: str = "float16",
    progress: Callable[[int, int], None] | None = None,
    dense_dtype: str = "float16",
) -> Store:
    """Write (or finish writing) the store of the safetensors model in ``model_dir``.

    ``dtype`` is how the layer weights are kept; with ``nf4`` the tensors that
    stay 16-bit (norms, biases, embeddings, head) use ``dense_dtype``.
    """
    sources = source_files(model_dir)
    if (path / MANIFEST).is_file():
        recorded = recorded_sources(path / MANIFEST)
        if recorded is None or recorded == sources:  # None: built before stores recorded their sources
            return open_store(path)
        clear_directory(path)  # built from other weights
    from safetensors import safe_open

    if dtype not in STORE_DTYPES:
        raise ValueError(f"store dtype must be one of {', '.join(STORE_DTYPES)}")
    four_bit = dtype == "nf4"
    target_dtype = TORCH_DTYPES[dense_dtype if four_bit else dtype]
    files = sorted(model_dir.glob("*.safetensors"))
    handles = [safe_open(str(f), framework="pt") for f in files]
    where = {name: h for h in handles for name in h.keys()}
    config = json.loads((model_dir / "config.json").read_text())
    num_layers = int(config["num_hidden_layers"])
    prefix = "model.layers.{}."
    shapes = [
        (name[len(prefix.format(0)) :], tuple(where[name].get_slice(name).get_shape()))
        for name in where
        if name.startswith(prefix.format(0))
    ]
    layout, layer_bytes = store_layout(shapes, dtype, dense_dtype)
    path.mkdir(parents=True, exist_ok=True)
    _start_build(path, sources)
    existing = sum(f.stat().st_size for f in path.glob("layer_*.bin"))
    check_free_disk(path, layer_bytes * num_layers - existing, "for the layer store", "free some space or choose another --store")
    crcs = _write_layers(path, where, layout, layer_bytes, num_layers, target_dtype, progress)
    _write_resident(path, where, target_dtype)
    shutil.copy(model_dir / "config.json", path / "config.json")
    manifest = {
        "format": FORMAT,
        "source": str(model_dir),
        "num_layers": num_layers,
        "dtype": dtype,
        "dense_dtype": str(target_dtype).removeprefix("torch."),
        "layer_bytes": layer_bytes,
        "layout": [slot.__dict__ | {"shape": list(slot.shape)} for slot in layout],
        "crc32": crcs,
        "source_files": sources,
    }
    atomic_write(path / MANIFEST, json.dumps(manifest, indent=1))
    (path / BUILDING).unlink(missing_ok=True)
    return open_store(path)


def _start_build(path: Path, sources: list[list]) -> None:
    """Drop what an interrupted build left that cannot be trusted, then record what is being built."""
    for stale in path.glob("*.partial"):
        stale.unlink()
    if (path / BUILDING).is_file() and recorded_sources(path / BUILDING) != sources:
        clear_directory(path)  # an interrupted build of other weights: its layers are not ours
    atomic_write(path / BUILDING, json.dumps({"source_files": sources}))


def _write_resident(path: Path, where: dict, dense: torch.dtype) -> None:
    """The tensors outside the decoder layers (embeddings, final norm, head), in ``dense``."""
    from safetensors.torch import save_file

    resident = {name: where[name].get_tensor(name).to(dense).contiguous() for name in where if not name.startswith("model.layers.")}
    partial = path / (RESIDENT + ".partial")
    save_file(resident, str(partial), metadata={"format": "pt"})
    os.replace(partial, path / RESIDENT)


def _write_layers(
    path: Path,
    where: dict,
    layout: tuple[TensorSlot, ...],
    layer_bytes: int,
    num_layers: int,
    dense: torch.dtype,
    progress: Callable[[int, int], None] | None,
) -> list[int]:
    """Write every layer file that is not already complete; returns each layer's CRC-32."""
    prefix = "model.layers.{}."
    crcs = []
    for index in range(num_layers):
        final = path / f"layer_{index:03d}.bin"
        blob = bytearray(layer_bytes)
        for slot in layout:
            tensor = where[prefix.format(index) + slot.name].get_tensor(prefix.format(index) + slot.name)
            if tuple(tensor.shape) != slot.shape:
                raise CorruptModel(f"layer {index} tensor {slot.name} has shape {tuple(tensor.shape)}, expected {slot.shape}")
            _place(blob, slot, tensor, dense)
        crcs.append(zlib.crc32(blob))
        if not (final.is_file() and final.stat().st_size == layer_bytes):
            atomic_write(final, blob)
        if progress:
            progress(index + 1, num_layers)
    return crcs


def source_files(model_dir: Path) -> list[list]:
    """What identifies the weights a store is built from: [name, bytes, mtime_ns] per safetensors file."""
    rows = []
    for file in sorted(model_dir.glob("*.safetensors")):
        stat = file.stat()  # follows the hub cache's symlinks to the blobs
        rows.append([file.name, stat.st_size, stat.st_mtime_ns])
    return rows


def recorded_sources(file: Path) -> list[list] | None:
    try:
        return json.loads(file.read_text()).get("source_files")
    except (OSError, ValueError, AttributeError):
        return None


def clear_directory(path: Path) -> None:
    """Empty a store directory, the manifest first, so that an interrupted clear is never trusted."""
    (path / MANIFEST).unlink(missing_ok=True)
    for file in path.iterdir():
        if file.is_file():
            file.unlink()


def _place(blob: bytearray, slot: TensorSlot, tensor: torch.Tensor, dense: torch.dtype) -> None:
    """Write ``tensor`` into the layer buffer at ``slot``, in the slot's storage format."""
    if slot.dtype == "nf4":
        packed, absmax = quantize_nf4(tensor)
        blob[slot.offset : slot.offset + packed.numel()] = packed.numpy().tobytes()
        start = slot.offset + absmax_offset(slot.shape)
        blob[start : start + 4 * absmax.numel()] = absmax.numpy().tobytes()
    else:
        blob[slot.offset : slot.offset + slot.nbytes] = tensor.to(dense).contiguous().view(torch.uint8).numpy().tobytes()
