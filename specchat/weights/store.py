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
checked on the first read of the layer in a process; the resident file's is
checked each time the store is opened for a load.  One process at a time builds
a store (``.lock``, see :func:`specchat.common.files.build_lock`).

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

from specchat.common.errors import CorruptModel, ResourceError
from specchat.common.files import LOCK, atomic_write, build_lock, check_free_disk, disk_full
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
    notice: Callable[[str], None] = lambda message: None,
) -> Store:
    """Write (or finish writing) the store of the safetensors model in ``model_dir``.

    ``dtype`` is how the layer weights are kept; with ``nf4`` the tensors that
    stay 16-bit (norms, biases, embeddings, head) use ``dense_dtype``.  A finished
    store is opened as it is (nothing is written: it may be read-only); one whose
    resident file fails its checksum gets that file rewritten.  A second process
    building the same store waits for the first and then uses what it built.
    ``notice`` hears of both.
    """
    if dtype not in STORE_DTYPES:
        raise ValueError(f"store dtype must be one of {', '.join(STORE_DTYPES)}")
    sources = source_files(model_dir)
    if _finished(path, sources):
        return open_store(path)
    with build_lock(path / LOCK, notice, f"building {path}"):
        if not _finished(path, sources):  # unless the process we waited for built it
            _build(model_dir, path, dtype, progress, dense_dtype, sources, notice)
    return open_store(path)


def _finished(path: Path, sources: list[list]) -> bool:
    """A manifest of these weights (or of unrecorded ones, from before stores recorded them)
    whose resident file matches its checksum."""
    if not (path / MANIFEST).is_file() or recorded_sources(path / MANIFEST) not in (None, sources):
        return False
    try:
        expected = json.loads((path / MANIFEST).read_text()).get("resident_crc32")
    except (OSError, ValueError, AttributeError):
        return False
    return expected is not None and _file_crc32(path / RESIDENT) == expected


def _build(model_dir: Path, path: Path, dtype: str, progress, dense_dtype: str, sources: list[list], notice) -> None:
    from safetensors import safe_open

    four_bit = dtype == "nf4"
    target_dtype = TORCH_DTYPES[dense_dtype if four_bit else dtype]
    files = sorted(model_dir.glob("*.safetensors"))
    handles = [safe_open(str(f), framework="pt") for f in files]
    where = {name: h for h in handles for name in h.keys()}
    if (path / MANIFEST).is_file():
        if recorded_sources(path / MANIFEST) in (None, sources):  # only the resident file is bad
            older = "resident_crc32" not in json.loads((path / MANIFEST).read_text())
            why = "has no checksum (a store from an older specchat)" if older else "is damaged (checksum mismatch)"
            notice(f"{path / RESIDENT} {why}; writing it again from the checkpoint")
            _rewrite_resident(path, where, target_dtype)
            return
        clear_directory(path)  # built from other weights
    config = json.loads((model_dir / "config.json").read_text())
    num_layers = int(config["num_hidden_layers"])
    prefix = "model.layers.{}."
    shapes = [
        (name[len(prefix.format(0)) :], tuple(where[name].get_slice(name).get_shape()))
        for name in where
        if name.startswith(prefix.format(0))
    ]
    layout, layer_bytes = store_layout(shapes, dtype, dense_dtype)
    _start_build(path, sources)
    existing = sum(f.stat().st_size for f in path.glob("layer_*.bin"))
    needed = layer_bytes * num_layers - existing + _resident_bytes(where, target_dtype)
    check_free_disk(path, needed, "for the layer store", "free some space or choose another --store")
    crcs = _write_layers(path, where, layout, layer_bytes, num_layers, target_dtype, progress)
    resident_crc = _write_resident(path, where, target_dtype)
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
        "resident_crc32": resident_crc,
        "source_files": sources,
    }
    atomic_write(path / MANIFEST, json.dumps(manifest, indent=1))
    (path / BUILDING).unlink(missing_ok=True)


def _start_build(path: Path, sources: list[list]) -> None:
    """Drop what an interrupted build left that cannot be trusted, then record what is being built."""
    for stale in path.glob("*.partial"):
        stale.unlink()
    if (path / BUILDING).is_file() and recorded_sources(path / BUILDING) != sources:
        clear_directory(path)  # an interrupted build of other weights: its layers are not ours
    atomic_write(path / BUILDING, json.dumps({"source_files": sources}))


def _resident_names(where: dict) -> list[str]:
    return [name for name in where if not name.startswith("model.layers.")]


def _resident_bytes(where: dict, dense: torch.dtype) -> int:
    width = torch.finfo(dense).bits // 8
    return sum(torch.Size(where[name].get_slice(name).get_shape()).numel() * width for name in _resident_names(where))


def _write_resident(path: Path, where: dict, dense: torch.dtype) -> int:
    """The tensors outside the decoder layers (embeddings, final norm, head), in ``dense``,
    written whole and renamed; returns the file's CRC-32.  A full disk is a ResourceError."""
    from safetensors.torch import save_file

    resident = {name: where[name].get_tensor(name).to(dense).contiguous() for name in _resident_names(where)}
    partial = path / (RESIDENT + ".partial")
    try:
        save_file(resident, str(partial), metadata={"format": "pt"})
        with open(partial, "rb") as handle:
            os.fsync(handle.fileno())
    except Exception as exc:  # safetensors reports a failed write as its own error, naming the OS error
        partial.unlink(missing_ok=True)
        if disk_full(exc):
            raise ResourceError(f"the disk filled up while writing {path / RESIDENT}", "free some space and run again") from exc
        raise
    os.replace(partial, path / RESIDENT)
    return _file_crc32(path / RESIDENT)


def _rewrite_resident(path: Path, where: dict, dense: torch.dtype) -> None:
    """A new resident file, and its checksum in the manifest, for a store whose file was damaged."""
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["resident_crc32"] = _write_resident(path, where, dense)
    atomic_write(path / MANIFEST, json.dumps(manifest, indent=1))


def _file_crc32(file: Path, chunk: int = 1 << 24) -> int | None:
    """CRC-32 of a file's bytes, read in chunks; None when it cannot be read."""
    crc = 0
    try:
        with open(file, "rb") as handle:
            while block := handle.read(chunk):
                crc = zlib.crc32(block, crc)
    except OSError:
        return None
    return crc


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
        if file.is_file() and file.name != LOCK:  # a builder may hold it
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
