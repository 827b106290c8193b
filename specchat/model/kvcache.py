"""A preallocated key/value cache with explicit rollback and pruning.

The decoder layers of transformers call ``cache.update(keys, values, layer_idx)``
and attend over whatever it returns, so this class only has to honour that one
method.  Everything else is ours: the engine appends a whole speculation tree in
one forward, then keeps only the accepted path (:meth:`KVCache.keep`) or rolls
back to a shorter prefix (:meth:`KVCache.crop`).

Shapes: one buffer per layer, ``(1, kv_heads, capacity, head_dim)``; slots
``[0, length)`` are valid.  Capacity doubles when a forward would overflow it.
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

    def reset(self) -> None:
        self.crop(0)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._keys + self._values if t is not None)

    # -- storage ----------------------------------------------------------------
    def _reserve(self, layer: int, like: torch.Tensor, needed: int) -> None:
        keys = self._keys[layer]
        if keys is not None and keys.shape[2] >= needed:
            return
        capacity = max(self._initial_capacity, needed)
        if keys is not None:
            capacity = max(capacity, 2 * keys.shape[2])
        shape = (like.shape[0], like.shape[1], capacity, like.shape[3])
        new_keys = like.new_empty(shape)
        new_values = like.new_empty(shape)
        length = self._lengths[layer]
        if keys is not None and length:
            new_keys[:, :, :length] = keys[:, :, :length]
            new_values[:, :, :length] = self._values[layer][:, :, :length]
        self._keys[layer], self._values[layer] = new_keys, new_values
