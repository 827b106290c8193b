"""The cost model behind ``--budget auto``: calibrated pass times and an online acceptance curve.

Throughput at tree budget K (SpecExec, arXiv 2406.02532, Sec. 3.3 / 5.2: one target
pass verifies the whole tree, so a pass yields E[tokens | K] tokens):

    tokens/s (K) = E[tokens per pass | K] / (D(K) + T(K))

* T(K), the target pass over K tree tokens, and D(K), the draft's tree growth at
  budget K, are **calibrated**: measured once per setup (``specchat setup``,
  ``specchat bench --calibrate``, or on the first ``--budget auto`` run) at a few
  sizes and interpolated piecewise-linearly in K (extrapolated along the last
  segment).  On a streamed target T is flat until compute catches up with the
  stream; on a resident CPU target it grows with K from the start.
* Online, each pass's measured times rescale T and D (a running ratio of measured
  to calibrated), so a busier machine moves the choice.
* E[tokens | K] is judged on the same passes for every K.  Each pass at budget K reports,
  besides its own tokens, what each smaller budget b would have given: SpecExec's tree is the
  K best-scored nodes and its b best ones are the tree budget b grows, so the target's path
  through them is known (``Tree.tokens_within``; SpecInfer samples its tree, and there the b
  best-scored nodes stand in for a smaller sample).  E(K) is the mean over the latest
  :data:`POOL` passes, whatever their budget, of what each gave or would have given at K;
  comparing budgets on the same passes keeps a hard stretch of one prompt from ruling out
  the budget it happened to run at.  For a K above a pass's own budget K_i the pass is
  extrapolated:
    - where the target refused a child inside the tree, a bigger tree holds more siblings:
      + g * log2((1 + K) / (1 + K_i)), g the mean last-doubling gain (tokens at K_i less those
      at K_i / 2) of the pool's passes that did not run out;
    - where the accepted path ended at a leaf ("ran out"), a bigger tree deepens it: the path
      of a accepted nodes would reach a * (K / K_i)**gamma, gamma from the pass's own last
      doubling (1 for a chain, as a draft made from the target grows; well under 1 for a
      bushy tree), and the target takes each further level with chance p, the pool's
      accepted levels over those plus its refusals:  + sum_{j=1..deeper} p**j.
  Before any pass, E(K) = 1 + beta * log2(1 + K) (the paper's observation that accepted tokens
  grow about with log K), capped at min(K, max_depth) + 1, beta a prior per draft kind,
  re-estimated from each pass as a running mean of (tokens - 1) / log2(1 + K_used).

The tuner picks the K among powers of two that maximises the predicted tokens/s.
Where passes at a K have been measured, their mean seconds replace D(K) + T(K): the
calibration grows full trees of K nodes, while at run time SpecExec's adaptive stop ends a
growth once another step would not pay (a sampled self draft at K=256 grew 50-120 nodes in
1.4-2.2 s where the calibration's 256-node tree took several times that), so a measured K
is judged by what it cost.  Once the chosen K has been measured the tuner also tries its
neighbours for a few passes each: K/2 when its seconds are unmeasured and the model rates it
within :data:`EXPLORE_MARGIN` of the best; 2K when too few pooled passes held a tree that big
and the model rates it within that margin, or it would beat K with no more drafting than K's
(the adaptive stop often ends a bigger tree's growth about where K's ended).
Seconds measured at a K unused for :data:`STALE_PASSES` passes are forgotten, so no budget is
ruled out for a whole session by a slow stretch.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from specchat.common.files import atomic_write

CANDIDATES = tuple(2**i for i in range(11))  # 1 .. 1024
PRIOR_BETA = 0.6  # tokens per doubling of K; the demo pair measured 0.54-0.65 (docs/benchmarks.md)
# A draft made from the target (self:int8: ~99% top-1 agreement, self:int4: ~98%) makes deep chains:
# 9.85 tokens per pass at K=16 and 11.64 at K=32 (session 18), 14.26 at K=256 (session 21) --
# 1.7-2.2 tokens per doubling.  Starting from the siblings' 0.6 the tuner settled on K=4-9 and
# rarely left it (docs/benchmarks.md, session 22).
SELF_DRAFT_PRIOR_BETA = 2.0
WEIGHT = 0.25  # of a new pass in the running estimates
MEASURED_PASSES = 3  # passes at one K before their mean replaces the curve there
WINDOW = 12  # passes per budget whose seconds are averaged
POOL = 24  # latest passes, any budget, whose tokens judge every budget
STALE_PASSES = 96  # a K not used for this many passes is measured afresh if chosen again
EXPLORE_MARGIN = 0.8  # try an unmeasured neighbour predicted at >= this fraction of the best


def interpolate(table: dict[int, float], k: float) -> float:
    """Piecewise-linear in k through the measured points; linear beyond the last two, flat below the first."""
    points = sorted(table.items())
    if not points:
        raise ValueError("empty calibration table")
    if k <= points[0][0] or len(points) == 1:
        return points[0][1] if k <= points[0][0] else points[-1][1]
    for (k0, v0), (k1, v1) in zip(points, points[1:]):
        if k <= k1:
            return v0 + (v1 - v0) * (k - k0) / (k1 - k0)
    (k0, v0), (k1, v1) = points[-2], points[-1]
    return v1 + max(v1 - v0, 0.0) * (k - k1) / (k1 - k0)


def non_decreasing(table: dict[int, float]) -> dict[int, float]:
    """A bigger tree never costs less: each point raised to the largest at or below its size.

    Each size is timed once, so noise can make a larger size look cheaper; without this the
    interpolated curve would have a dip that the tuner would pick for the noise's sake.
    """
    result, running = {}, float("-inf")
    for k, seconds in sorted(table.items()):
        running = max(running, seconds)
        result[k] = running
    return result


@dataclass(frozen=True)
class Calibration:
    """Measured seconds: target pass vs. tree size, draft growth vs. budget (per method), draft step vs. width."""

    target_s: dict[int, float]
    draft_s: dict[str, dict[int, float]]  # method -> budget -> seconds of tree growth
    draft_step_s: dict[int, float] = field(default_factory=dict)  # batch width -> seconds per draft forward

    def target(self, k: int) -> float:
        return interpolate(non_decreasing(self.target_s), k)

    def draft(self, method: str, k: int) -> float:
        table = self.draft_s.get(method) or next(iter(self.draft_s.values()), {})
        return interpolate(non_decreasing(table), k) if table else 0.0

    def to_json(self) -> dict:
        return {
            "target_s": {str(k): v for k, v in self.target_s.items()},
            "draft_s": {m: {str(k): v for k, v in t.items()} for m, t in self.draft_s.items()},
            "draft_step_s": {str(k): v for k, v in self.draft_step_s.items()},
        }

    @classmethod
    def from_json(cls, raw: dict) -> Calibration:
        return cls(
            target_s={int(k): float(v) for k, v in raw["target_s"].items()},
            draft_s={m: {int(k): float(v) for k, v in t.items()} for m, t in raw["draft_s"].items()},
            draft_step_s={int(k): float(v) for k, v in raw.get("draft_step_s", {}).items()},
        )


def load_calibration(path: Path, key: str) -> Calibration | None:
    """The calibration saved under ``key``, or None (absent, or the file unreadable)."""
    try:
        raw = json.loads(path.read_text())
        return Calibration.from_json(raw[key])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def calibrated_choices(path: Path, method: str = "specexec", max_depth: int = 32) -> list[dict[str, str]]:
    """Each saved calibration (its settings key) with the budget ``auto`` would start at, and why."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    choices = []
    for key, value in raw.items() if isinstance(raw, dict) else ():
        try:
            tuner = CostModelTuner(Calibration.from_json(value), method, max_depth)
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # a damaged entry: setup re-measures it
        choices.append({"settings": key, "budget": str(tuner.current), "reason": tuner.explain()})
    return choices


def save_calibration(path: Path, key: str, calibration: Calibration) -> None:
    """Add or replace ``key`` in the calibration file (atomic replace; other keys kept)."""
    try:
        everything = json.loads(path.read_text())
        if not isinstance(everything, dict):
            everything = {}
    except (OSError, ValueError):
        everything = {}
    everything[key] = calibration.to_json()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(everything, indent=1) + "\n")


@dataclass
class _Pass:
    budget: int
    tokens: float
    draft_s: float
    target_s: float
    ran_out: bool = False  # the accepted path ended at a leaf of the tree
    within: dict[int, float] = field(default_factory=dict)  # smaller budget -> tokens within its best nodes


class CostModelTuner:
    """Chooses the budget K with the highest predicted tokens/s; learns from every pass."""

    def __init__(
        self, calibration: Calibration, method: str, max_depth: int, initial: int | None = None, prior_beta: float = PRIOR_BETA,
        largest: int = CANDIDATES[-1],
    ) -> None:
        self.calibration = calibration
        self.candidates = tuple(k for k in CANDIDATES if k <= largest) or CANDIDATES[:1]  # what the RAM can hold
        self.method = method
        self.max_depth = max_depth
        self.beta = prior_beta
        self.target_ratio = 1.0  # measured / calibrated target seconds
        self.draft_ratio = 1.0
        self._pool: deque[_Pass] = deque(maxlen=POOL)  # the latest passes, whatever their budget
        self._passes: dict[int, deque[_Pass]] = {}  # K -> its latest passes, for their seconds
        self._last_used: dict[int, int] = {}  # K -> the pass count when it was last observed
        self._pass_count = 0
        self.current = initial if initial is not None else self.best()

    def candidates_below(self, budget: int) -> tuple[int, ...]:
        """The budgets smaller than ``budget`` whose tokens a pass at ``budget`` should report."""
        return tuple(k for k in self.candidates if k < budget)

    # -- the model ---------------------------------------------------------------------
    def curve(self, k: int) -> float:
        """The prior: E(K) = 1 + beta * log2(1 + K), at most min(K, max_depth) + 1 tokens."""
        return min(1.0 + self.beta * math.log2(1 + k), min(k, self.max_depth) + 1.0)

    def _last_doubling(self, run: _Pass) -> float | None:
        """What the pass's last doubling of budget gave: its tokens less those within half its budget."""
        half = run.within.get(run.budget // 2)
        return None if half is None else run.tokens - half

    def doubling_gain(self) -> float:
        """g, the tokens a doubling adds to a pass that the target ended inside the tree (a refused
        child): the mean last doubling of the pool's passes that did not run out (beta where none)."""
        gains = [gain for run in self._pool if not run.ran_out and (gain := self._last_doubling(run)) is not None]
        return sum(gains) / len(gains) if gains else self.beta

    def continuation(self) -> float:
        """p, the chance that the target takes one more level of a path the tree holds: the pool's
        accepted levels over those plus its refusals (a pass that ran out was never refused)."""
        accepted = sum(max(run.tokens - 1.0, 0.0) for run in self._pool)
        refused = sum(not run.ran_out for run in self._pool)
        return accepted / (accepted + refused + 1.0)

    def _deeper(self, run: _Pass, k: int) -> float:
        """Levels a tree of k nodes adds below the end of a path that ran out at depth a: the path
        deepens as a * (k / K)**gamma, gamma from its own last doubling, a(K) = a(K/2) * 2**gamma
        (a chain's 1: as deep again; a bushy tree's well under 1), clamped to [0, 1]."""
        accepted, half = run.tokens - 1.0, run.within.get(run.budget // 2)
        gamma = 1.0 if half is None or half <= 1.0 else min(max(math.log2(accepted / (half - 1.0)), 0.0), 1.0)
        return max(min(self.max_depth, accepted * (k / run.budget) ** gamma) - accepted, 0.0)

    def _tokens_at(self, run: _Pass, k: int, p: float, g: float) -> float:
        """What ``run`` would have given at budget k (see the module's docstring)."""
        if k == run.budget:
            return run.tokens
        if k < run.budget:
            if k in run.within:
                return run.within[k]
            return max(1.0, min(run.tokens, run.tokens * self.curve(k) / self.curve(run.budget)))
        if run.ran_out:  # the target takes each level further with chance p: sum of p**j, j = 1 .. deeper
            deeper = self._deeper(run, k)
            gained = p * (1.0 - p**deeper) / (1.0 - p) if p < 1.0 else deeper
        else:  # a refused child: a bigger tree holds more siblings
            gained = g * math.log2((1 + k) / (1 + run.budget))
        return min(run.tokens + gained, min(k, self.max_depth) + 1.0)

    def expected_tokens(self, k: int) -> float:
        if not self._pool:
            return self.curve(k)
        p, g = self.continuation(), self.doubling_gain()
        return sum(self._tokens_at(run, k, p, g) for run in self._pool) / len(self._pool)

    def _measured_mean(self, k: int, part: str) -> float | None:
        """The mean of ``part`` ("draft_s", "target_s") over K's passes, once measured; else None."""
        if not self._measured(k):
            return None
        runs = self._passes[k]
        return sum(getattr(r, part) for r in runs) / len(runs)

    def predicted_seconds(self, k: int) -> float:
        if self._measured(k):
            return self._measured_mean(k, "draft_s") + self._measured_mean(k, "target_s")
        return self.draft_ratio * self.calibration.draft(self.method, k) + self.target_ratio * self.calibration.target(k)

    def throughput(self, k: int) -> float:
        return self.expected_tokens(k) / max(self.predicted_seconds(k), 1e-9)

    def _optimistic_throughput(self, bigger: int, k: int) -> float:
        """2K's predicted tokens over its seconds with no more drafting than K's where 2K's own are
        unmeasured: SpecExec's adaptive stop often ends a bigger tree's growth about where K's ended."""
        draft_s = self._measured_mean(bigger, "draft_s") if self._measured(bigger) else self._measured_mean(k, "draft_s")
        target_s = self._measured_mean(bigger, "target_s") if self._measured(bigger) else self.target_ratio * self.calibration.target(bigger)
        return self.expected_tokens(bigger) / max(draft_s + target_s, 1e-9)

    def best(self) -> int:
        return max(self.candidates, key=lambda k: (self.throughput(k), -k))

    def _measured(self, k: int) -> bool:
        """Has K been run often enough for its own seconds to replace the calibration's?"""
        return len(self._passes.get(k, ())) >= MEASURED_PASSES

    def _tokens_measured(self, k: int) -> bool:
        """Do enough of the pool's passes hold K's tree (a budget at least K) to know its tokens?"""
        return sum(run.budget >= k for run in self._pool) >= MEASURED_PASSES

    def _choose(self) -> int:
        if not self._measured(self.current):
            return self.current  # finish measuring the budget being tried
        best = self.best()
        if self._measured(best):
            smaller, bigger = best // 2, best * 2
            if smaller in self.candidates and not self._measured(smaller):
                if self.throughput(smaller) >= EXPLORE_MARGIN * self.throughput(best):
                    return smaller
            if bigger in self.candidates and not self._tokens_measured(bigger):
                rate = self.throughput(best)
                if self.throughput(bigger) >= EXPLORE_MARGIN * rate or self._optimistic_throughput(bigger, best) > rate:
                    return bigger
        return best

    # -- learning ----------------------------------------------------------------------
    def observe(
        self, budget: int, tokens: float, draft_s: float, target_s: float, ran_out: bool = False,
        within: dict[int, float] | None = None,
    ) -> None:
        """One pass at ``budget``: its tokens, seconds, whether its accepted path ended at a leaf, and
        (``within``) the tokens it would have given at smaller budgets (:meth:`Tree.tokens_within`)."""
        run = _Pass(budget, tokens, draft_s, target_s, ran_out, dict(within or {}))
        self._pool.append(run)
        self._passes.setdefault(budget, deque(maxlen=WINDOW)).append(run)
        self._pass_count += 1
        self._last_used[budget] = self._pass_count
        self._forget_stale()
        self.beta = (1 - WEIGHT) * self.beta + WEIGHT * max(tokens - 1, 0) / math.log2(1 + budget)
        calibrated_target = self.calibration.target(budget)
        if calibrated_target > 0:
            self.target_ratio = (1 - WEIGHT) * self.target_ratio + WEIGHT * target_s / calibrated_target
        calibrated_draft = self.calibration.draft(self.method, budget)
        if calibrated_draft > 0:
            self.draft_ratio = (1 - WEIGHT) * self.draft_ratio + WEIGHT * draft_s / calibrated_draft
        self.current = self._choose()

    def _forget_stale(self) -> None:
        """Drop the seconds measured at budgets unused for :data:`STALE_PASSES` passes.

        A slow stretch at a K would otherwise rule it out for the whole session; forgotten, it
        is judged by the calibration again and re-measured if that makes it worth trying."""
        for k in [k for k, last in self._last_used.items() if self._pass_count - last > STALE_PASSES]:
            del self._passes[k], self._last_used[k]

    def explain(self) -> str:
        k = self.current
        second = max((c for c in self.candidates if c != k), key=self.throughput, default=k)
        if self._measured(k):
            draft_s, target_s = self._measured_mean(k, "draft_s"), self._measured_mean(k, "target_s")
            split = f"{draft_s:.2f} s draft + {target_s:.2f} s target, measured over {len(self._passes[k])} passes"
        else:
            split = (f"{self.draft_ratio * self.calibration.draft(self.method, k):.2f} s draft + "
                     f"{self.target_ratio * self.calibration.target(k):.2f} s target")
        return (
            f"K={k}: predicted {self.throughput(k):.2f} tok/s = {self.expected_tokens(k):.2f} tok/pass / "
            f"({split}); next best K={second} "
            f"{self.throughput(second):.2f} tok/s; acceptance {self.beta:.2f} tok per doubling of K"
        )
