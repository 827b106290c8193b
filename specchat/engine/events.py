"""What the engine yields.  The UI renders these; the engine never prints."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PrefillEvent:
    """Progress through a long prompt's prefill (more than one chunk): after each tenth of it."""

    done: int  # the share of the prefill done, in prompt tokens (it runs layer by layer: done/total of every layer's work)
    total: int  # prompt tokens this request prefills


@dataclass(frozen=True)
class TextEvent:
    """New text and the token ids that produced it, after one target pass."""

    text: str
    token_ids: tuple[int, ...]
    accepted: int  # draft tokens the target accepted this pass (new tokens - 1)
    tree_size: int  # tree nodes the target verified, root excluded (0 for AR)
    draft_s: float
    target_s: float


@dataclass(frozen=True)
class GenerationStats:
    method: str
    budget: int
    prefill_tokens: int
    new_tokens: int
    target_passes: int
    tokens_per_pass: float
    tokens_per_s: float
    wall_s: float
    prefill_s: float
    draft_s: float
    target_s: float
    disk_read_bytes: int  # storage bytes read during the whole request
    decode_read_bytes: int  # of which after the prefill: the streamed target's passes
    finish_reason: str  # "eos" | "length" | "stop" | "interrupted"
    tree_nodes: int = 0  # tree nodes the target verified over all passes, roots excluded (0 in logs that did not record it)
    prompt_tokens: int = 0  # the whole prompt, cached prefix included (0 in logs that did not record it)
    lookahead_hits: int = 0  # passes whose tree was begun while the target verified the one before

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DoneEvent:
    text: str
    token_ids: tuple[int, ...]
    stats: GenerationStats


Event = PrefillEvent | TextEvent | DoneEvent
