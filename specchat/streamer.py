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

Where the store already holds the compute dtype (a bf16 store for a bf16 target) the
convert stage is skipped: each layer slot's weights *are* a read buffer (``zero_copy``),
so a read lands where the compute reads it and no byte is copied on the way.

:meth:`StreamedLayers.prefetch` starts the next pass's first reads early -- the engine
calls it before the draft grows its tree, so the disk does not sit idle while the draft
computes.  Layers listed as resident (those that fit ``--ram-budget``) are loaded once
and never read again.
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
RING = 2  # read buffers, and as many layer slots, when layers are converted
ZERO_COPY_RING = 4  # buffers that are the slots: the same RAM as RING buffers + RING slots of a 16-bit layer
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


class _PassState:
    """The reads and conversions started for one pass (by :meth:`StreamedLayers.prefetch` or the pass itself)."""

    def __init__(self) -> None:
        self.reads: dict[int, Future] = {}  # stream position -> read into buffer position % n_buffers
        self.fills: dict[int, Future] = {}  # stream position -> conversion into slot position % n_slots


class StreamedLayers:
    """A :class:`~specchat.lm.LayerSource` over a store: >= 2 read buffers and >= 2 layer slots.

    Where the store holds the layers in the compute dtype (a bf16 store for a bf16 target)
    nothing needs converting: each slot's parameters are views into its own read buffer
    (``zero_copy``), a read *is* the layer's weights, and the conversion stage and its
    copy of every streamed byte disappear.
    """

    def __init__(
        self,
        store: Store,
        make_layer,  # (layer index) -> nn.Module in the compute dtype, uninitialised
        resident: set[int] = frozenset(),
        ring: int | None = None,  # layers in flight; None: RING, or ZERO_COPY_RING where no conversion is needed
        direct: bool = True,
    ) -> None:
        self.store = store
        self.reader = StoreReader(store, direct)
        self.streamed = [i for i in range(store.num_layers) if i not in resident]
        self.resident: dict[int, nn.Module] = {}
        first = LayerSlot(make_layer(0), store)
        self.zero_copy = all(
            slot.dtype in _DTYPES and _DTYPES[slot.dtype] == param.dtype for slot, param in zip(store.layout, first.params)
        )
        depth = min(ring or (ZERO_COPY_RING if self.zero_copy else RING), max(len(self.streamed), 1))
        self.buffers = [ReadBuffer(store) for _ in range(depth)]
        for index in sorted(resident):
            slot = LayerSlot(make_layer(index), store)
            self.reader.read_into(index, self.buffers[0].buffer)
            self.buffers[0].convert_into(slot)
            self.resident[index] = slot.module
        self.slots = [first] + [LayerSlot(make_layer(0), store) for _ in range(depth - 1)]
        if self.zero_copy:  # slot i's weights live in buffer i
            for slot, buffer in zip(self.slots, self.buffers):
                for param, view in zip(slot.params, buffer.views):
                    param.data = view
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="specchat-read")
        # One CPU thread converts, so that it does not fight the compute threads for the cores.
        self._convert = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="specchat-convert", initializer=torch.set_num_threads, initargs=(CONVERT_THREADS,)
        )
        self._prefetched: _PassState | None = None

    def prefetch(self) -> None:
        """Start reading (and converting) the first streamed layers of the next pass now.

        The engine calls this before the draft grows its tree, so that the disk is busy while
        the draft computes instead of idle; a layer's weights do not depend on the pass's input."""
        if self._prefetched is None and self.streamed:
            self._prefetched = self._start_pass()

    def _read(self, q: int) -> None:
        self.reader.read_into(self.streamed[q], self.buffers[q % len(self.buffers)].buffer)

    def _fill(self, q: int, state: _PassState) -> LayerSlot:
        """Conversion stage: read buffer -> layer slot, then free the buffer for a later read."""
        state.reads.pop(q).result()
        slot = self.slots[q % len(self.slots)]
        self.buffers[q % len(self.buffers)].convert_into(slot)
        _set_layer_index(slot.module, self.streamed[q])
        if q + len(self.buffers) < len(self.streamed):
            state.reads[q + len(self.buffers)] = self._io.submit(self._read, q + len(self.buffers))
        return slot

    def _start_pass(self) -> _PassState:
        state = _PassState()
        for q in range(min(len(self.buffers), len(self.streamed))):
            state.reads[q] = self._io.submit(self._read, q)
        if not self.zero_copy:
            for q in range(min(len(self.slots), len(self.streamed))):
                state.fills[q] = self._convert.submit(self._fill, q, state)
        return state

    def _next_streamed(self, q: int, state: _PassState) -> nn.Module:
        if self.zero_copy:
            state.reads.pop(q).result()
            module = self.slots[q % len(self.slots)].module
            _set_layer_index(module, self.streamed[q])
            return module
        return state.fills.pop(q).result().module

    def _release(self, q: int, state: _PassState) -> None:
        """The caller is done with stream position ``q``'s slot: refill it with position q + ring."""
        later = q + len(self.slots)
        if later >= len(self.streamed):
            return
        if self.zero_copy:  # the slot is the buffer: read straight into it
            state.reads[later] = self._io.submit(self._read, later)
        else:
            state.fills[later] = self._convert.submit(self._fill, later, state)

    def layers(self) -> Iterator[nn.Module]:
        """Yield every decoder layer in order; streamed ones are read (and converted) ahead."""
        state, self._prefetched = self._prefetched or self._start_pass(), None
        position = 0
        try:
            for index in range(self.store.num_layers):
                if index in self.resident:
                    _set_layer_index(self.resident[index], index)
                    yield self.resident[index]
                    continue
                yield self._next_streamed(position, state)
                self._release(position, state)
                position += 1
        finally:
            for future in list(state.fills.values()) + list(state.reads.values()):  # an interrupted pass: let work finish
                future.exception()
            for future in list(state.reads.values()):  # reads started by the fills just awaited
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
