"""Streaming decoder layers to a compute device that is not the host (a CUDA GPU).

Where the layers wait between passes:

  host     the layer file's bytes in page-locked ("pinned") host RAM, loaded once
           (``--offload ram``, and the layers ``--ram-budget`` keeps in ssd mode);
  store    read from the layer store on every pass into one of a ring of pinned
           *staging* buffers (``--offload ssd``), with direct I/O as on the CPU path;
  device   a copy that stays on the GPU (the layers that fit the free VRAM): a ready
           module for a 16-bit store; for a 4-bit store the layer *file* (packed
           NF4 bytes), dequantised into a slot on every pass, so that 4-bit layers
           take 4-bit room on the GPU.

Every pass, each non-resident layer goes host -> device through a ring of
``ring`` device *slots*.  A slot is a uint8 device buffer of one layer file plus
a decoder-layer module whose parameters are filled from it (a plain copy for a
16-bit store, NF4 dequantisation on the GPU for a 4-bit one).  On CUDA the copy
and the fill run on a side stream, ordered by events, so that layer q+1's copy
overlaps layer q's compute:

  side stream     wait free[s] -> H2D copy into buffer s -> fill module s -> record ready[s]
  compute stream  wait ready[s] -> run layer in module s -> record free[s]

A staging buffer is refilled from the store only once the copy out of it has
finished (``staged[b]``, awaited by the reader thread).  The same code runs with
``device="cpu"`` -- no pinning, no streams, synchronous copies -- which is how
the tests exercise the ring and the ordering on a machine without a GPU.
"""

from __future__ import annotations

import mmap
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from specchat.model.stream.storeio import PAGE, StoreReader, fill_params, layers_in_order, set_layer_index, tensor_views
from specchat.weights.store import Store


def host_buffer(nbytes: int, pin: bool, registered: list[int] | None = None) -> torch.Tensor:
    """(nbytes,) uint8 in host RAM, page-aligned (for O_DIRECT), page-locked when ``pin``.

    Pinning registers an exact-size anonymous mapping with cudaHostRegister (its address is
    appended to ``registered``, for :func:`unregister`): torch's pinned allocator would round
    every layer up to a power of two (up to 2x the RAM).  If the registration fails, torch's
    pinned allocator is the fallback.  The tensor keeps its mapping alive.
    """
    mapping = mmap.mmap(-1, nbytes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "non-writable buffer" does not apply to an anonymous mapping
        tensor = torch.frombuffer(mapping, dtype=torch.uint8)
    if pin:
        if not _register(tensor.data_ptr(), nbytes):
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        if registered is not None:
            registered.append(tensor.data_ptr())
    return tensor


_REGISTER_WORKS: bool | None = None  # cudaHostRegister refused once (e.g. WSL): never try again


def _register(pointer: int, nbytes: int) -> bool:
    global _REGISTER_WORKS
    if _REGISTER_WORKS is False:
        return False
    if torch.cuda.cudart().cudaHostRegister(pointer, nbytes, 0) == 0:
        _REGISTER_WORKS = True
        return True
    _REGISTER_WORKS = False
    # The failure stays CUDA's "last error" until read, and torch's next launch check would
    # report it as its own: launch a trivial kernel, whose check reads (and clears) it.
    try:
        torch.ones(1, device="cuda").add_(1)
        torch.cuda.synchronize()
    except RuntimeError:
        pass
    return False


def unregister(registered: list[int]) -> None:
    """Undo the cudaHostRegister calls of :func:`host_buffer` (before the mappings go away)."""
    while registered:
        torch.cuda.cudart().cudaHostUnregister(registered.pop())


class DeviceSlot:
    """A device buffer for one layer file and a module whose parameters are filled from it."""

    def __init__(self, module: nn.Module, store: Store, device: torch.device) -> None:
        self.module = module
        named = dict(module.named_parameters())
        self.params = [named[s.name] for s in store.layout]
        self.buffer = torch.empty(store.layer_bytes, dtype=torch.uint8, device=device)
        self.views = tensor_views(self.buffer, store.layout)


class _Sync:
    """Streams and events on CUDA; the same calls do nothing on a CPU device."""

    def __init__(self, device: torch.device, slots: int, staging: int) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.side = torch.cuda.Stream(device)
            self.ready = [torch.cuda.Event() for _ in range(slots)]
            self.free = [torch.cuda.Event() for _ in range(slots)]
            self.staged = [torch.cuda.Event() for _ in range(staging)]

    def start_pass(self, device: torch.device) -> None:
        """The side stream runs after everything launched so far (the slots' set-up, and the
        layer of an interrupted pass whose ``free`` event was never recorded)."""
        if self.cuda:
            self.side.wait_stream(torch.cuda.current_stream(device))

    def side_stream(self):
        return torch.cuda.stream(self.side) if self.cuda else _NoStream()

    def wait_slot_free(self, s: int) -> None:  # on the side stream
        if self.cuda:
            self.side.wait_event(self.free[s])

    def slot_ready(self, s: int) -> None:  # on the side stream
        if self.cuda:
            self.ready[s].record(self.side)

    def staging_copied(self, b: int) -> None:  # on the side stream
        if self.cuda:
            self.staged[b].record(self.side)

    def wait_staging_copied(self, b: int) -> None:  # on the reader thread: block until the H2D copy is done
        if self.cuda:
            self.staged[b].synchronize()

    def compute_waits_ready(self, s: int, device: torch.device) -> None:
        if self.cuda:
            torch.cuda.current_stream(device).wait_event(self.ready[s])

    def compute_done_with(self, s: int, device: torch.device) -> None:
        if self.cuda:
            self.free[s].record(torch.cuda.current_stream(device))


class _NoStream:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class DeviceStreamedLayers:
    """A :class:`~specchat.lm.LayerSource` whose layers are copied to ``device`` on every pass.

    ``host``: layer indices kept in (pinned) host RAM; ``device_resident``: kept on the device
    as modules; ``device_files``: kept on the device as layer files (4-bit), filled into a slot
    every pass; every other layer is read from the store on every pass.
    """

    def __init__(
        self,
        store: Store,
        make_layer,  # (layer index) -> nn.Module in the compute dtype on ``device``, uninitialised
        device: torch.device | str,
        host: set[int] = frozenset(),
        device_resident: set[int] = frozenset(),
        device_files: set[int] = frozenset(),
        ring: int = 2,
        direct: bool = True,
    ) -> None:
        self.store = store
        self.device = torch.device(device)
        pin = self.device.type == "cuda"
        self.reader = StoreReader(store, direct)
        streamed = [i for i in range(store.num_layers) if i not in device_resident]
        self.order = streamed  # stream position q -> layer index
        self.from_store = [i for i in streamed if i not in host and i not in device_files]
        n_slots = min(ring, max(len(streamed), 1))
        n_staging = min(ring, max(len(self.from_store), 1)) if self.from_store else 0
        self._registered: list[int] = []  # host buffers registered with CUDA (unregistered in __del__)
        self.staging = [host_buffer(store.layer_bytes, pin, self._registered) for _ in range(n_staging)]
        self.sync = _Sync(self.device, n_slots, n_staging)
        scratch = host_buffer(store.layer_bytes, False)
        self.host: dict[int, torch.Tensor] = {}
        for index in sorted(host):
            self.host[index] = host_buffer(store.layer_bytes, pin, self._registered)
            self._read(index, self.host[index])
        self.resident: dict[int, nn.Module] = {}
        for index in sorted(device_resident):  # filled once, through a temporary slot
            slot = DeviceSlot(make_layer(index), store, self.device)
            self._read(index, scratch)
            slot.buffer.copy_(scratch)
            fill_params(slot.params, slot.views)
            slot.buffer = slot.views = None  # the module keeps its own parameters
            self.resident[index] = slot.module
        self.device_files: dict[int, list] = {}  # layer index -> views of its file on the device
        for index in sorted(device_files):
            self._read(index, scratch)
            buffer = scratch.to(self.device, copy=True)  # its own copy, also when the device is the CPU
            self.device_files[index] = tensor_views(buffer, store.layout)  # the views keep it alive
        del scratch
        self.slots = [DeviceSlot(make_layer(0), store, self.device) for _ in range(n_slots)]
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="specchat-read")

    def _read(self, index: int, buffer: torch.Tensor) -> None:
        """Read layer ``index``'s file into a host buffer (O_DIRECT only if the buffer is page-aligned)."""
        self.reader.read_into(index, buffer.numpy(), allow_direct=buffer.data_ptr() % PAGE == 0)

    def layers(self) -> Iterator[nn.Module]:
        """Yield every decoder layer in order; the next ones are copied (and read) ahead."""
        order, store_order = self.order, self.from_store
        store_position = {index: k for k, index in enumerate(store_order)}
        n_slots, n_staging = len(self.slots), len(self.staging)
        reads: dict[int, Future] = {}  # store position -> read into staging[k % n_staging]

        def read(k: int) -> None:
            b = k % n_staging
            self.sync.wait_staging_copied(b)  # the previous copy out of this buffer has finished
            self._read(store_order[k], self.staging[b])

        def enqueue(q: int) -> None:
            """Start copying stream position q's layer into slot q % n_slots (on the side stream)."""
            index, s = order[q], q % n_slots
            k = store_position.get(index)
            if k is not None:
                reads.pop(k).result()
            slot = self.slots[s]
            with self.sync.side_stream():
                self.sync.wait_slot_free(s)
                if index in self.device_files:  # already on the device: dequantise straight from it
                    fill_params(slot.params, self.device_files[index])
                else:
                    source = self.host[index] if k is None else self.staging[k % n_staging]
                    slot.buffer.copy_(source, non_blocking=self.sync.cuda)  # (layer_bytes,) uint8 host -> device
                    if k is not None:
                        self.sync.staging_copied(k % n_staging)
                    fill_params(slot.params, slot.views)
                self.sync.slot_ready(s)
            if k is not None and k + n_staging < len(store_order):  # this staging buffer's next read
                reads[k + n_staging] = self._io.submit(read, k + n_staging)

        self.sync.start_pass(self.device)
        for k in range(min(n_staging, len(store_order))):
            reads[k] = self._io.submit(read, k)
        for q in range(min(n_slots, len(order))):
            enqueue(q)

        def next_streamed(q: int, index: int) -> nn.Module:
            s = q % n_slots
            self.sync.compute_waits_ready(s, self.device)
            module = self.slots[s].module
            set_layer_index(module, index)
            return module

        def release(q: int) -> None:
            # The caller has launched this layer's work: the slot is free once that work is done.
            self.sync.compute_done_with(q % n_slots, self.device)
            if q + n_slots < len(order):  # the slot's next layer
                enqueue(q + n_slots)

        try:
            yield from layers_in_order(self.store.num_layers, self.resident, next_streamed, release)
        finally:
            for future in list(reads.values()):  # an interrupted pass: let the reads finish
                future.exception()

    def __del__(self) -> None:
        if not getattr(self, "_registered", None):
            return
        try:
            torch.cuda.synchronize(self.device)  # no copy may still read a buffer being unpinned
            unregister(self._registered)
        except Exception:  # interpreter shutdown, or a CUDA context already gone: nothing left to undo
            pass

    def bytes_read(self) -> int:
        return self.reader.bytes

    def read_counters(self) -> tuple[int, float]:
        return self.reader.bytes, self.reader.read_s

    def measure_stream_bandwidth(self) -> float | None:
        """Bytes/s of reading every store-streamed layer once, alone (None when none streams from the store)."""
        if not self.from_store:
            return None
        scratch = self.staging[0]
        self.sync.wait_staging_copied(0)  # a copy out of it may still be in flight
        start = time.perf_counter()
        for index in self.from_store:
            self._read(index, scratch)
        return len(self.from_store) * self.store.layer_bytes / (time.perf_counter() - start)

    def resident_bytes(self) -> int:
        """Host RAM held by layers between passes (pinned host copies)."""
        return sum(buffer.numel() for buffer in self.host.values())
