"""A preallocated key/value cache with explicit rollback and pruning.

The decoder layers of transformers call ``cache.update(keys, values, layer_idx)``
and attend over whatever it returns, so this class only has to honour that one
method.  Everything else is ours: the engine appends a whole speculation tree in
one forward, then keeps only the accepted path (:meth:`KVCache.keep`) or rolls
back to a shorter prefix (:meth:`KVCache.crop`).

Shapes: one buffer per layer, ``(1, kv_heads, capacity, head_dim)``; slots
``[0, length)`` are valid.  Capacity is the initial capacity times a power of two, doubled
(or more) when a forward would overflow it: conversations of every length then allocate
buffers of a few recurring sizes, which the C allocator reuses once freed instead of leaving
the heap fragmented by one size per conversation.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, initial_capacity: int = 256) -> None:
        self.num_layers = num_layers
        self._initial_capacity = initial_capacity
        self._keys: list[torch.Tensor | None] = [None] * num_layers
        self._values: list[torch.Tensor | None] = [None] * num_layers
        self._lengths = [0] * num_layers

    # -- what transformers calls -------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``(1, kv_heads, T, head_dim)`` states; return all valid slots of the layer."""
        start = self._lengths[layer_idx]
        end = start + key_states.shape[-2]
        self._reserve(layer_idx, key_states, end)
        keys, values = self._keys[layer_idx], self._values[layer_idx]
        keys[:, :, start:end] = key_states
        values[:, :, start:end] = value_states
        self._lengths[layer_idx] = end
        return keys[:, :, :end], values[:, :, :end]  # (1, kv_heads, end, head_dim)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._lengths[layer_idx]

    # -- what the engine calls ---------------------------------------------------
    @property
    def length(self) -> int:
        """Number of positions valid in every layer.

        All layers agree between forwards.  A forward interrupted between layers
        (Ctrl-C during a streamed pass) leaves the first layers longer; only the
        shortest length is valid everywhere, so that is what rollback starts from.
        """
        return min(self._lengths)

    def crop(self, length: int) -> None:
        """Roll back to the first ``length`` positions."""
        if length < 0 or length > self.length:
            raise ValueError(f"cannot crop a cache of {self.length} positions to {length}")
        self._lengths = [length] * self.num_layers

    def keep(self, start: int, slots: torch.Tensor) -> None:
        """Keep positions ``[0, start)`` followed by ``slots`` (absolute, ascending, >= start).

        This is how a verified tree is pruned to its accepted path: the prefix
        stays in place and the accepted nodes' entries move down behind it.
        """
        slots = slots.to(torch.long)
        if slots.numel() and (int(slots.min()) < start or int(slots.max()) >= self.length):
            raise ValueError(f"slots out of range [{start}, {self.length})")
        new_length = start + slots.numel()
        for layer in range(self.num_layers):
            keys, values = self._keys[layer], self._values[layer]
            if keys is None:
                continue
            idx = slots.to(keys.device)
            # index_select copies first, so overlapping source/destination is safe.
            keys[:, :, start:new_length] = keys.index_select(2, idx)
            values[:, :, start:new_length] = values.index_select(2, idx)
            self._lengths[layer] = new_length

    def keep_draft(self, start: int, slots: torch.Tensor) -> None:
        """A draft's way of keeping entries the target has not verified yet: for a cache of its
        own, the same as :meth:`keep` (see :meth:`SharedPrefixCache.keep_draft` for the other)."""
        self.keep(start, slots)

    def reset(self) -> None:
        """Forget everything and free the buffers: their capacity is the longest conversation
        seen, which a new one should not keep holding."""
        self._keys = [None] * self.num_layers
        self._values = [None] * self.num_layers
        self._lengths = [0] * self.num_layers

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._keys + self._values if t is not None)

    # -- storage ----------------------------------------------------------------
    def _reserve(self, layer: int, like: torch.Tensor, needed: int) -> None:
        keys = self._keys[layer]
        if keys is not None and keys.shape[2] >= needed:
            return
        capacity = self._initial_capacity  # * 2**k: at least double the old one, and one of a few sizes
        while capacity < needed:
            capacity *= 2
        shape = (like.shape[0], like.shape[1], capacity, like.shape[3])
        new_keys = like.new_empty(shape)
        new_values = like.new_empty(shape)
        length = self._lengths[layer]
        if keys is not None and length:
            new_keys[:, :, :length] = keys[:, :, :length]
            new_values[:, :, :length] = self._values[layer][:, :, :length]
        self._keys[layer], self._values[layer] = new_keys, new_values


class SharedPrefixCache:
    """A draft's cache whose committed prefix *is* the target's cache.

    For a draft made from the target itself (same architecture, same positions), the target's
    keys and values for the conversation are exact where the draft's own would be rounded, and
    reusing them means the draft never prefills.  Only the draft's own forwards -- the root and
    the tree's nodes -- go into ``tail``:

        slots [0, start)            the target's cache (read, never written)
        slots [start, start + n)    the draft's tail

    While the tail is empty the view follows the target's cache (``start`` = its length), so
    once the engine has pruned the target's cache to the accepted path, :meth:`keep` only has
    to empty the tail.  The engine crops the target's cache before this one (both to the same
    limit), so a crop never asks for less than the target holds.
    """

    def __init__(self, base: KVCache) -> None:
        self.base = base
        self.num_layers = base.num_layers
        self.tail = KVCache(base.num_layers)
        self._start = 0  # the target's length when the tail's first entry was written

    def _tail_empty(self) -> bool:
        return max(self.tail._lengths) == 0

    @property
    def start(self) -> int:
        return self.base.length if self._tail_empty() else self._start

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``(1, kv_heads, T, head_dim)`` draft states; return the target's prefix + the tail."""
        if self._tail_empty():
            self._start = self.base.length
        keys, values = self.tail.update(key_states, value_states, layer_idx)
        base_keys, base_values = self.base._keys[layer_idx], self.base._values[layer_idx]
        if self._start == 0 or base_keys is None:
            return keys, values
        prefix_keys = base_keys[:, :, : self._start].to(keys.dtype)  # (1, kv_heads, start, head_dim)
        prefix_values = base_values[:, :, : self._start].to(values.dtype)
        return torch.cat([prefix_keys, keys], 2), torch.cat([prefix_values, values], 2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start + self.tail.get_seq_length(layer_idx)

    @property
    def length(self) -> int:
        return self.start + self.tail.length

    def crop(self, length: int) -> None:
        if length < 0 or length > self.length:
            raise ValueError(f"cannot crop a cache of {self.length} positions to {length}")
        start = self.start
        self.tail.crop(length - start if length >= start else 0)
        if self.length != length:
            raise ValueError(f"crop the target's cache to {length} first (it holds {self.base.length})")

    def keep(self, start: int, slots: torch.Tensor) -> None:
        """The accepted path's keys and values are the target's now: drop the tail."""
        self.tail.crop(0)

    def keep_draft(self, start: int, slots: torch.Tensor) -> None:
        """Keep positions ``[0, start)`` followed by the draft's own entries at ``slots`` (absolute,
        ascending, >= start), moved down behind them -- entries the target has not verified, such
        as a lookahead tree's.  Where the target's cache holds exactly ``[0, start)`` it serves
        those positions and the tail keeps only ``slots``; where it holds less, the tail keeps
        its own entries up to ``start`` as well."""
        slots = slots.to(torch.long)
        own = self.start
        if start == self.base.length:
            self.tail.keep(0, slots - own)
            self._start = start
        elif start > self.base.length and start >= own:
            self.tail.keep(start - own, slots - own)
        else:
            raise ValueError(f"cannot keep {start} positions: the target's cache holds {self.base.length}, the tail starts at {own}")

    def reset(self) -> None:
        self.tail.reset()

    def nbytes(self) -> int:
        return self.tail.nbytes()
