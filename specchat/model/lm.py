"""The narrow model interface the engine talks to, and its layer-by-layer implementation.

The engine never calls a transformers model directly.  It calls
:meth:`LanguageModel.forward` with token ids, their absolute positions and a
boolean visibility matrix over *all* cache slots (the cached ones followed by
the new ones).  That single signature serves the plain prefix, a speculation
tree (ancestor mask) and a batch of draft nodes alike.

:class:`LayeredLM` runs a decoder-only transformers model (Llama, Qwen2,
Mistral, Mixtral, ...) by walking its pieces by hand -- embedding, decoder
layers, final norm, LM head -- so that the decoder layers can come from
anywhere: resident modules or a streamer that pages them in from RAM or SSD.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Iterable, Iterator
from typing import Protocol

import torch
from torch import nn

from specchat.model.kvcache import KVCache


class LanguageModel(Protocol):
    vocab_size: int
    max_context: int
    num_layers: int

    def new_cache(self) -> KVCache: ...

    def prefetch(self) -> None:
        """A hint that :meth:`forward` is coming (a streamed target starts reading its layers)."""

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor, cache: KVCache,
        logit_rows: torch.Tensor | None = None,
    ) -> torch.Tensor: ...  # as LayeredLM.forward

    def prefill(self, input_ids: torch.Tensor, start: int, cache: KVCache, chunk: int) -> Iterator[float]: ...  # as LayeredLM.prefill


class LayerSource(Protocol):
    """Yields the decoder layers in order, ready to call, once per forward."""

    def layers(self) -> Iterator[nn.Module]: ...

    def bytes_read(self) -> int: ...


class ResidentLayers:
    """All decoder layers live on the compute device for the whole run."""

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self._modules = list(modules)

    def layers(self) -> Iterator[nn.Module]:
        return iter(self._modules)

    def bytes_read(self) -> int:
        return 0


class UpcastEmbedding(nn.Module):
    """An embedding table kept in its checkpoint's 16-bit dtype; the looked-up rows leave in the
    compute dtype.

    A forward reads only T rows, so the table need not be float32 on a CPU: up-casting 16-bit
    values is exact (the same numbers a float32 copy of the checkpoint holds) and the table
    takes half the RAM -- 0.47 GB less for the demo target, whose head is a separate matrix.
    """

    def __init__(self, weight: torch.Tensor, out_dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (vocab, hidden) 16-bit
        self.out_dtype = out_dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(input_ids, self.weight).to(self.out_dtype)  # (..., hidden)


def keep_embedding_16bit(hf_model: nn.Module, checkpoint_dtype: torch.dtype | None) -> None:
    """Swap a float32 embedding table for its 16-bit checkpoint values (see :class:`UpcastEmbedding`),
    unless the head shares it (tied) or the checkpoint was not 16-bit."""
    embed = hf_model.model.embed_tokens
    tied = hf_model.lm_head.weight is embed.weight or hf_model.lm_head.weight.data_ptr() == embed.weight.data_ptr()
    if tied or embed.weight.dtype != torch.float32 or checkpoint_dtype not in (torch.float16, torch.bfloat16):
        return
    hf_model.model.embed_tokens = UpcastEmbedding(embed.weight.detach().to(checkpoint_dtype), torch.float32)


def causal_visibility(cached: int, new: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(new, cached + new) bool: every new token sees the whole cache and its own predecessors."""
    tri = torch.ones(new, new, dtype=torch.bool, device=device).tril()
    return torch.cat([torch.ones(new, cached, dtype=torch.bool, device=device), tri], dim=1)


@functools.cache
def _cache_keyword(layer_class: type) -> str:
    """What a decoder layer calls its KV cache argument: ``cache`` from transformers 5.24 on, before
    that ``past_key_values`` (which 5.24 still takes, with a deprecation warning on every run)."""
    parameters = inspect.signature(layer_class.forward).parameters  # follows the deprecation wrapper
    return "cache" if "cache" in parameters else "past_key_values"


class LayeredLM:
    """A decoder-only causal LM run piece by piece over a :class:`LayerSource`."""

    def __init__(self, hf_model: nn.Module, layer_source: LayerSource | None = None) -> None:
        base = getattr(hf_model, "model", None)
        needed = ("embed_tokens", "layers", "norm", "rotary_emb")
        if base is None or not all(hasattr(base, name) for name in needed):
            kind = type(hf_model).__name__
            raise TypeError(f"{kind} is not a decoder-only model with embed/layers/norm/rotary parts")
        config = hf_model.config
        self.config = config
        self.embed_tokens = base.embed_tokens
        self.rotary_emb = base.rotary_emb
        self.norm = base.norm
        self.lm_head = hf_model.lm_head
        self.layer_source = layer_source or ResidentLayers(base.layers)
        self.num_layers = config.num_hidden_layers
        self.vocab_size = hf_model.lm_head.out_features
        self.max_context = int(getattr(config, "max_position_embeddings", 4096))
        self.dtype = self.norm.weight.dtype  # the compute dtype (the embedding table may be 16-bit)
        self.layer_dtype = self.dtype  # the hidden states' dtype inside the decoder layers
        self.kv_source: LayeredLM | None = None  # a model whose cached keys/values this one can attend to
        self.device = self.embed_tokens.weight.device

    def with_layers(
        self, layer_source: LayerSource, layer_dtype: torch.dtype, shares_cache: bool = False, lm_head: nn.Module | None = None,
    ) -> LayeredLM:
        """Another model over the same embeddings, rotary table, final norm and head (shared, not
        copied; or ``lm_head`` for the head) with other decoder layers, whose hidden states are in
        ``layer_dtype``; with ``shares_cache`` it attends to this model's cached keys and values for
        the committed prefix (:class:`~specchat.model.kvcache.SharedPrefixCache`)."""
        other = copy.copy(self)
        other.layer_source, other.layer_dtype = layer_source, layer_dtype
        other.lm_head = lm_head if lm_head is not None else self.lm_head
        other.kv_source = self if shares_cache else None
        return other

    def new_cache(self) -> KVCache:
        return KVCache(self.num_layers)

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        visible: torch.Tensor,
        cache: KVCache,
        logit_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (R, vocab) in float32 on the CPU for ``logit_rows`` of the T new tokens (all rows if None).

        input_ids: (T,) long; positions: (T,) long absolute positions;
        visible:   (T, cache.length + T) bool, True where a query may attend.
        """
        n_new = input_ids.shape[0]
        if visible.shape != (n_new, cache.length + n_new):
            raise ValueError(f"visibility {tuple(visible.shape)} != ({n_new}, {cache.length + n_new})")
        ids = input_ids.to(self.device)[None]  # (1, T)
        pos = positions.to(self.device)[None]  # (1, T)
        hidden = self.embed_tokens(ids).to(self.layer_dtype)  # (1, T, hidden)
        cos_sin = self.rotary_emb(hidden, pos)  # 2 x (1, T, head_dim)
        mask = self._additive_mask(visible.to(self.device), hidden.dtype)  # (1, 1, T, S)
        for layer in self.layer_source.layers():
            hidden = self._through(layer, hidden, mask, pos, cos_sin, cache)  # (1, T, hidden)
        hidden = hidden[0].to(self.dtype)  # (T, hidden)
        if logit_rows is not None:
            hidden = hidden.index_select(0, logit_rows.to(self.device))
        hidden = self.norm(hidden)
        # On the host: sampling, seeds and tree bookkeeping run on the CPU whatever computed the logits
        # (a (256, 152k) float32 block is ~155 MB, ~10 ms over PCIe, small beside a streamed pass).
        return self.lm_head(hidden).float().cpu()  # (R, vocab)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, start: int, cache: KVCache, chunk: int) -> Iterator[float]:
        """Feed T prompt tokens at positions [start, start + T) into ``cache``, layer by layer: every
        chunk of ``chunk`` tokens goes through a layer before the next layer is fetched, so a
        streamed model reads each layer once for the whole prompt (token by token in chunks
        it would read every layer once per chunk).  Computes no logits.  Yields the share done
        after each chunk of each layer.

        A chunk at layer l attends to the cache of layer l, which then holds the prompt's earlier
        chunks: the same keys, values and outputs as chunk after chunk through all layers.
        """
        n_new = input_ids.shape[0]
        ids = input_ids.to(self.device)[None]  # (1, T)
        pos = torch.arange(start, start + n_new, device=self.device)[None]  # (1, T)
        hidden = self.embed_tokens(ids).to(self.layer_dtype)  # (1, T, hidden): each layer overwrites it chunk by chunk
        cos, sin = self.rotary_emb(hidden, pos)  # 2 x (1, T, head_dim)
        spans = [(a, min(a + chunk, n_new)) for a in range(0, n_new, chunk)]
        steps = len(spans) * self.num_layers
        for index, layer in enumerate(self.layer_source.layers()):
            for number, (a, b) in enumerate(spans, 1):
                mask = self._additive_mask(causal_visibility(start + a, b - a, self.device), hidden.dtype)  # (1, 1, b-a, start+b)
                part = (cos[:, a:b], sin[:, a:b])
                hidden[:, a:b] = self._through(layer, hidden[:, a:b], mask, pos[:, a:b], part, cache)
                yield (index * len(spans) + number) / steps

    @staticmethod
    def _additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(T, S) bool -> (1, 1, T, S): 0 where visible, the dtype's minimum elsewhere."""
        mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
        mask.masked_fill_(~visible, torch.finfo(dtype).min)
        return mask[None, None]

    def _through(self, layer: nn.Module, hidden, mask, pos, cos_sin, cache) -> torch.Tensor:
        """One decoder layer over (1, T, hidden), appending its keys and values to ``cache``."""
        out = layer(
            hidden, attention_mask=mask, position_ids=pos, use_cache=True, position_embeddings=cos_sin,
            **{_cache_keyword(type(layer)): cache},
        )
        return out[0] if isinstance(out, tuple) else out  # (1, T, hidden)

    def prefetch(self) -> None:
        """A hint that a forward is coming: a streamed layer source starts fetching its first layers."""
        prefetch = getattr(self.layer_source, "prefetch", None)
        if prefetch is not None:
            prefetch()

    @property
    def waiting_for_layers(self):
        """A :class:`threading.Event` set while a forward waits for a streamed layer to arrive
        (the CPU is idle then), or None where the layer source never waits."""
        return getattr(self.layer_source, "waiting", None)

    def bytes_read(self) -> int:
        return self.layer_source.bytes_read()
