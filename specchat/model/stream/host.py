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
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from specchat.model.stream.storeio import StoreReader, fill_params, layers_in_order, set_layer_index, tensor_views
from specchat.weights.store import TORCH_DTYPES, Store


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
        self.views = tensor_views(torch.frombuffer(self.buffer, dtype=torch.uint8), store.layout)

    def convert_into(self, slot: LayerSlot) -> None:
        fill_params(slot.params, self.views)


CONVERT_THREADS = 1  # torch threads of the conversion stage (a per-thread setting)
RING = 2  # read buffers, and as many layer slots, when layers are converted
ZERO_COPY_RING = 4  # buffers that are the slots: the same RAM as RING buffers + RING slots of a 16-bit layer


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
            slot.dtype in TORCH_DTYPES and TORCH_DTYPES[slot.dtype] == param.dtype for slot, param in zip(store.layout, first.params)
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
        # Set while a pass waits for the disk: the CPU is idle then (the lookahead's cue to compute).
        self.waiting = threading.Event()

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
        set_layer_index(slot.module, self.streamed[q])
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
            self._wait(state.reads.pop(q))
            module = self.slots[q % len(self.slots)].module
            set_layer_index(module, self.streamed[q])
            return module
        return self._wait(state.fills.pop(q)).module

    def _wait(self, future: Future):
        """The future's result; while the compute thread waits for it, :attr:`waiting` is set."""
        if future.done():
            return future.result()
        self.waiting.set()
        try:
            return future.result()
        finally:
            self.waiting.clear()

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
        try:
            yield from layers_in_order(
                self.store.num_layers, self.resident, lambda q, index: self._next_streamed(q, state), lambda q: self._release(q, state)
            )
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

