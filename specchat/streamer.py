"""Streaming decoder layers from the layer store: disk -> read buffers -> layer slots -> compute.

Three stages run at once, each on its own thread, so that a pass costs about
max(read, convert, compute) per layer instead of their sum:

  read     an I/O thread fills a ring of page-aligned *read buffers* with whole
           layer files (O_DIRECT where the filesystem allows it, otherwise a
           buffered read followed by POSIX_FADV_DONTNEED, so that the page cache
           cannot quietly turn SSD mode into RAM mode);
  convert  a second thread turns a read buffer into a *layer slot* -- a decoder
           layer module in the compute dtype -- converting 16-bit storage or
           dequantising 4-bit NF4 weights, then frees the buffer for the next read;
  compute  the caller runs the slot's layer; when it asks for the next layer, the
           slot it leaves is handed to the conversion of a later layer.

Layers listed as resident (those that fit ``--ram-budget``) are loaded once and
never read again.
"""

from __future__ import annotations

import mmap
import os
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from .errors import CorruptModel
from .quant4 import absmax_count, absmax_offset, dequantize_nf4, packed_bytes
from .store import Store, _DTYPES

O_DIRECT = getattr(os, "O_DIRECT", 0)


class LayerSlot:
    """A decoder layer module in the compute dtype that streamed layers pass through."""

    def __init__(self, module: nn.Module, store: Store) -> None:
        self.module = module
        params = dict(module.named_parameters())
        self.params = [params[s.name] for s in store.layout]  # in layout order


class ReadBuffer:
    """A page-aligned buffer (as O_DIRECT needs) holding one layer file, with views of its tensors."""

    def __init__(self, store: Store) -> None:
        self.buffer = mmap.mmap(-1, store.layer_bytes)
        self.views = [_stored_view(self.buffer, s) for s in store.layout]

    def convert_into(self, slot: LayerSlot) -> None:
        with torch.no_grad():
            for param, stored in zip(slot.params, self.views):
                if isinstance(stored, tuple):  # NF4: (packed (n/2,) uint8, absmax (n/64,) float32)
                    dequantize_nf4(*stored, tuple(param.shape), out=param.data)
                else:
                    param.copy_(stored)  # (shape) 16-bit -> compute dtype


CONVERT_THREADS = 1  # torch threads of the conversion stage (a per-thread setting)
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


class StreamedLayers:
    """A :class:`~specchat.lm.LayerSource` over a store: >= 2 read buffers and >= 2 layer slots."""

    def __init__(
        self,
        store: Store,
        make_layer,  # (layer index) -> nn.Module in the compute dtype, uninitialised
        resident: set[int] = frozenset(),
        ring: int = 2,
        direct: bool = True,
    ) -> None:
        self.store = store
        self.reader = StoreReader(store, direct)
        self.streamed = [i for i in range(store.num_layers) if i not in resident]
        self.resident: dict[int, nn.Module] = {}
        depth = min(ring, max(len(self.streamed), 1))
        self.buffers = [ReadBuffer(store) for _ in range(depth)]
        for index in sorted(resident):
            slot = LayerSlot(make_layer(index), store)
            self.reader.read_into(index, self.buffers[0].buffer)
            self.buffers[0].convert_into(slot)
            self.resident[index] = slot.module
        self.slots = [LayerSlot(make_layer(0), store) for _ in range(depth)]
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="specchat-read")
        # One CPU thread converts, so that it does not fight the compute threads for the cores.
        self._convert = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="specchat-convert", initializer=torch.set_num_threads, initargs=(CONVERT_THREADS,)
        )

    def layers(self) -> Iterator[nn.Module]:
        """Yield every decoder layer in order; streamed ones are read and converted ahead."""
        order = self.streamed  # position q in the stream -> layer index
        reads: dict[int, Future] = {}
        fills: dict[int, Future] = {}
        n_buffers, n_slots = len(self.buffers), len(self.slots)

        def read(q: int) -> None:
            self.reader.read_into(order[q], self.buffers[q % n_buffers].buffer)

        def fill(q: int) -> LayerSlot:
            reads.pop(q).result()
            slot = self.slots[q % n_slots]
            self.buffers[q % n_buffers].convert_into(slot)
            _set_layer_index(slot.module, order[q])
            if q + n_buffers < len(order):  # this read buffer is free: start a later read
                reads[q + n_buffers] = self._io.submit(read, q + n_buffers)
            return slot

        for q in range(min(n_buffers, len(order))):
            reads[q] = self._io.submit(read, q)
        for q in range(min(n_slots, len(order))):
            fills[q] = self._convert.submit(fill, q)
        position = 0
        try:
            for index in range(self.store.num_layers):
                if index in self.resident:
                    _set_layer_index(self.resident[index], index)
                    yield self.resident[index]
                    continue
                slot = fills.pop(position).result()
                yield slot.module
                # The caller is done with this slot: convert the layer that will reuse it.
                if position + n_slots < len(order):
                    fills[position + n_slots] = self._convert.submit(fill, position + n_slots)
                position += 1
        finally:
            for future in list(fills.values()) + list(reads.values()):  # an interrupted pass: let work finish
                future.exception()
            for future in list(reads.values()):  # reads started by the fills just awaited
                future.exception()

    def bytes_read(self) -> int:
        return self.reader.bytes

    def read_counters(self) -> tuple[int, float]:
        """(bytes read, seconds spent reading them) so far: their ratio over a span of passes is
        the bandwidth the disk delivered *while* the passes ran (the reader thread only reads)."""
        return self.reader.bytes, self.reader.read_s

    def measure_stream_bandwidth(self) -> float | None:
        """Bytes/s of reading every streamed layer file once, alone (the stream's physical limit)."""
        if not self.streamed:
            return None
        scratch = mmap.mmap(-1, self.store.layer_bytes)
        start = time.perf_counter()
        for index in self.streamed:
            self.reader.read_into(index, scratch)
        scratch.close()
        return len(self.streamed) * self.store.layer_bytes / (time.perf_counter() - start)

    def resident_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for m in self.resident.values() for p in m.parameters())


def _stored_view(buffer: mmap.mmap, slot) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The tensor ``slot`` inside a layer buffer, without copying (for NF4: packed bytes and absmax)."""
    if slot.dtype == "nf4":
        packed = torch.frombuffer(buffer, dtype=torch.uint8, count=packed_bytes(slot.shape), offset=slot.offset)
        absmax = torch.frombuffer(
            buffer, dtype=torch.float32, count=absmax_count(slot.shape), offset=slot.offset + absmax_offset(slot.shape)
        )
        return packed, absmax
    dtype = _DTYPES[slot.dtype]
    count = slot.nbytes * 8 // torch.finfo(dtype).bits
    return torch.frombuffer(buffer, dtype=dtype, count=count, offset=slot.offset).view(slot.shape)


def _set_layer_index(module: nn.Module, index: int) -> None:
    """Point the slot's attention at layer ``index`` of the KV cache."""
    attention = getattr(module, "self_attn", None)
    if attention is not None:
        attention.layer_idx = index
