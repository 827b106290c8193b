"""Reading layer files from the layer store, and turning a layer file into a decoder layer's weights.

Both streamers (:mod:`specchat.model.stream.host` for the CPU, :mod:`specchat.model.stream.device`
for another device) read whole layer files with :class:`StoreReader`, see a layer file's tensors
through :func:`tensor_views`, fill a layer module from them with :func:`fill_params` and yield
the layers of a pass with :func:`layers_in_order`.
"""

from __future__ import annotations

import mmap
import os
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from specchat.common.errors import CorruptModel
from specchat.weights.quant4 import absmax_count, absmax_offset, dequantize_nf4, packed_bytes
from specchat.weights.store import TORCH_DTYPES, Store, TensorSlot

O_DIRECT = getattr(os, "O_DIRECT", 0)
PAGE = 4096  # O_DIRECT needs page-aligned memory; a misaligned buffer is read without it
CHUNK = 4 << 20  # bytes per read request; several in flight keep the SSD's queue busy
READ_THREADS = 4


def read_file_direct(path, buffer: mmap.mmap, size: int, pool: ThreadPoolExecutor, direct: bool) -> bool:
    """Read ``size`` bytes of ``path`` into ``buffer`` in parallel chunks; returns whether O_DIRECT was used.

    With O_DIRECT the page cache is bypassed; where the filesystem refuses it
    (tmpfs, some overlays) the file is read normally and then dropped from
    the page cache with POSIX_FADV_DONTNEED, so the next pass reads the disk again.
    """
    fd = -1
    if direct and O_DIRECT:
        try:
            fd = os.open(path, os.O_RDONLY | O_DIRECT)
        except OSError:
            direct = False
    if fd < 0:
        direct = False
        fd = os.open(path, os.O_RDONLY)
    view = memoryview(buffer)

    def read_chunk(offset: int) -> None:
        end = min(offset + CHUNK, size)
        while offset < end:
            n = os.preadv(fd, [view[offset:end]], offset)
            if n <= 0:
                raise CorruptModel(f"layer store file {path} is truncated", "rebuild the store with `specchat setup`")
            offset += n

    try:
        for future in [pool.submit(read_chunk, offset) for offset in range(0, size, CHUNK)]:
            future.result()
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return direct


class StoreReader:
    """Reads whole layer files, bypassing the page cache."""

    def __init__(self, store: Store, direct: bool = True) -> None:
        self.store = store
        self.direct = direct and bool(O_DIRECT)
        self.bytes = 0  # bytes requested from the store so far
        self.read_s = 0.0  # seconds spent waiting for those reads (not for free buffers)
        self._verified: set[int] = set()
        self._pool = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="specchat-read")

    def read_into(self, index: int, buffer, allow_direct: bool = True) -> None:
        """Read layer ``index``'s file into ``buffer`` (any writable buffer of ``layer_bytes``; O_DIRECT
        needs it page-aligned, so pass ``allow_direct=False`` for one that may not be)."""
        path = self.store.layer_file(index)
        start = time.perf_counter()
        used = read_file_direct(path, buffer, self.store.layer_bytes, self._pool, self.direct and allow_direct)
        if allow_direct:
            self.direct = used  # the filesystem refused O_DIRECT: do not try again
        self.read_s += time.perf_counter() - start
        self.bytes += self.store.layer_bytes
        if index not in self._verified:
            if zlib.crc32(buffer) != self.store.crc32[index]:
                raise CorruptModel(f"layer store file {path} is corrupt (checksum mismatch)", f"delete {self.store.path} and rebuild it")
            self._verified.add(index)


def tensor_views(buffer: torch.Tensor, layout: tuple[TensorSlot, ...]) -> list[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """The stored tensors inside a (layer_bytes,) uint8 buffer on any device, without copying.

    16-bit slot -> (shape) tensor; NF4 slot -> ((n/2,) uint8 packed, (n/64,) float32 absmax).
    Store offsets are 4 KiB-aligned, so every dtype view is aligned too.
    """
    views = []
    for slot in layout:
        if slot.dtype == "nf4":
            packed = buffer[slot.offset : slot.offset + packed_bytes(slot.shape)]
            start = slot.offset + absmax_offset(slot.shape)
            absmax = buffer[start : start + 4 * absmax_count(slot.shape)].view(torch.float32)
            views.append((packed, absmax))
        else:
            views.append(buffer[slot.offset : slot.offset + slot.nbytes].view(TORCH_DTYPES[slot.dtype]).view(slot.shape))
    return views


def fill_params(params: list[nn.Parameter], views) -> None:
    """Write one layer's stored tensors (on the parameters' device) into its module's parameters.

    A 16- or 32-bit tensor is copied (converted to the compute dtype); NF4 is dequantised straight
    into the parameter."""
    with torch.no_grad():
        for param, stored in zip(params, views):
            if isinstance(stored, tuple):  # NF4: (packed (n/2,) uint8, absmax (n/64,) float32)
                dequantize_nf4(*stored, tuple(param.shape), out=param.data)
            else:
                param.copy_(stored)  # (shape) stored dtype -> compute dtype


def set_layer_index(module: nn.Module, index: int) -> None:
    """Point the slot's attention at layer ``index`` of the KV cache."""
    attention = getattr(module, "self_attn", None)
    if attention is not None:
        attention.layer_idx = index


def layers_in_order(
    num_layers: int,
    resident: dict[int, nn.Module],
    next_streamed: Callable[[int, int], nn.Module],  # (stream position, layer index) -> its module
    release: Callable[[int], None],  # (stream position): the caller is done with that layer
) -> Iterator[nn.Module]:
    """Yield layers 0 .. ``num_layers`` - 1: the resident module where there is one, otherwise
    the next streamed one; a streamed layer is released when the caller asks for the following layer."""
    position = 0
    for index in range(num_layers):
        if index in resident:
            set_layer_index(resident[index], index)
            yield resident[index]
            continue
        yield next_streamed(position, index)
        release(position)
        position += 1
