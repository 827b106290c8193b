"""`--budget auto`: pick the tree budget K that gives the most tokens per second, from measurements.

Throughput at budget K is E[tokens per pass | K] / (draft s + target s per pass).  All three
terms depend on the machine, the offload mode, the draft and the text, so instead of
predicting them we measure them: every pass records (K, tokens, seconds).  The tuner hill-
climbs over powers of two -- it tries the neighbours 2K and K/2 of the best budget measured
so far for a few passes each, and moves when a neighbour is faster.  On a streamed target,
where a pass costs about the same for 1 or hundreds of tokens, this climbs to large trees;
on a resident CPU target, where compute grows with K, it settles on small ones.

Only the most recent passes of each K count, so the choice follows a change of text or load.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

TRIAL_PASSES = 3  # passes at a budget before it is compared
WINDOW = 12  # most recent passes kept per budget


@dataclass(frozen=True)
class Measurement:
    tokens: int
    seconds: float


class BudgetTuner:
    def __init__(self, initial: int, low: int = 2, high: int = 1024) -> None:
        self.low, self.high = low, high
        self.current = min(max(initial, low), high)
        self._history: dict[int, deque[Measurement]] = {}

    def observe(self, budget: int, tokens: int, seconds: float) -> None:
        self._history.setdefault(budget, deque(maxlen=WINDOW)).append(Measurement(tokens, seconds))
        self.current = self._next()

    def throughput(self, budget: int) -> float | None:
        runs = self._history.get(budget)
        if not runs or len(runs) < TRIAL_PASSES:
            return None
        return sum(r.tokens for r in runs) / max(sum(r.seconds for r in runs), 1e-9)

    def _next(self) -> int:
        measured = {k: t for k in self._history if (t := self.throughput(k)) is not None}
        if self.current not in measured:
            return self.current  # still trying the current budget
        best = max(measured, key=measured.get)
        for neighbour in (best * 2, best // 2):
            if self.low <= neighbour <= self.high and neighbour not in measured:
                return neighbour
        return best

    def explain(self) -> str:
        measured = sorted((k, t) for k in self._history if (t := self.throughput(k)) is not None)
        if not measured:
            return f"K={self.current}, measuring"
        table = ", ".join(f"K={k} {t:.2f} tok/s" for k, t in measured)
        best = max(measured, key=lambda item: item[1])[0]
        verdict = "the fastest measured" if best == self.current else "trying it"
        return f"K={self.current}, {verdict} ({table})"
