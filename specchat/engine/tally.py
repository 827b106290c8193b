"""What one :meth:`Engine.generate` call has produced so far, and the stats it ends with."""

from __future__ import annotations

from dataclasses import dataclass, field

from specchat.engine.events import GenerationStats
from specchat.speculation.speculator import Speculator


@dataclass
class Tally:
    """One reply's tokens and per-pass sums (the engine adds each committed pass)."""

    speculator: Speculator | None  # chosen once per request; None for plain decoding
    new_ids: list[int] = field(default_factory=list)
    passes: int = 0
    tree_nodes: int = 0  # verified tree nodes, roots excluded
    lookahead_hits: int = 0  # passes whose tree the lookahead had begun
    draft_s: float = 0.0
    target_s: float = 0.0
    finish: str = "length"

    def add_pass(self, tree_size: int, draft_s: float, target_s: float) -> None:
        self.passes += 1
        self.tree_nodes += tree_size
        self.draft_s += draft_s
        self.target_s += target_s

    def stats(
        self, *, method: str, budget: int, prompt_tokens: int, prefill_tokens: int, wall_s: float, prefill_s: float,
        disk_read_bytes: int, decode_read_bytes: int,
    ) -> GenerationStats:
        """The reply's stats; its speed counts the decoding only (the wall after the prefill)."""
        new = len(self.new_ids)
        return GenerationStats(
            method=method,
            budget=budget,
            prefill_tokens=prefill_tokens,
            new_tokens=new,
            target_passes=self.passes,
            tokens_per_pass=new / self.passes if self.passes else 0.0,
            tokens_per_s=new / max(wall_s - prefill_s, 1e-9),
            wall_s=wall_s,
            prefill_s=prefill_s,
            draft_s=self.draft_s,
            target_s=self.target_s,
            disk_read_bytes=disk_read_bytes,
            decode_read_bytes=decode_read_bytes,
            finish_reason=self.finish,
            tree_nodes=self.tree_nodes,
            prompt_tokens=prompt_tokens,
            lookahead_hits=self.lookahead_hits,
        )
