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
* E[tokens | K] follows the paper's observation that accepted tokens grow about
  with log K:  E(K) = 1 + beta * log2(1 + K), capped at min(K, max_depth) + 1.  beta starts
  at a prior and is re-estimated from every pass of the session (running mean of
  (tokens - 1) / log2(1 + K_used)); where passes at a K have been measured, their
  mean tokens replace the curve, so a budget whose acceptance saturated is judged
  by what it really gave.

The tuner picks the K among powers of two that maximises the predicted tokens/s.
Where passes at a K have been measured, their mean seconds replace D(K) + T(K) as their
mean tokens replace the curve: the calibration grows full trees of K nodes, while at run
time SpecExec's adaptive stop ends a growth once another step would not pay (a sampled
self draft at K=256 grew 50-120 nodes in 1.4-2.2 s where the calibration's 256-node tree
took several times that), so a measured K is judged by what it cost.
Because the model is only a model, once the chosen K has been measured the tuner also
tries its unmeasured neighbours for a few passes each: K/2 when the model rates it
within :data:`EXPLORE_MARGIN` of the best, 2K when it could beat K on an optimistic
bound -- one more doubling's tokens (beta) for no more drafting than K's, over the
calibrated target pass at 2K:  (E(K) + beta) / (D_measured(K) + T(2K)) > tokens/s (K).
Measured means then settle the choice, so the tuner climbs while bigger trees pay.
A pass whose accepted path ended at a leaf of its tree "ran out": the target took everything the
tree held down that path, so a bigger tree could have given more.  How much more depends on the
tree's shape: where K's passes took a chain of nearly all K nodes (a draft made from the target,
whose favourite chains the target takes whole), 2K holds a chain twice as deep; a bushy tree
(a sibling's) grows little deeper with 2K.  So K's *chain share*

    c(K) = (share of K's passes that ran out) * (E(K) - 1) / K

adds c(K) * (E(K) - 1) tokens to the optimistic bound for 2K where that beats beta, and, where
c(K) >= 1/2, a measurement of 2K not renewed for :data:`WINDOW` passes is dropped, to be taken
again: it may date from passes before the greedy agreement (speculation/agreement.py) was
learnt, when the same budget grew bushier trees.
Measurements of a K unused for :data:`STALE_PASSES` passes are forgotten, so no
budget is ruled out for a whole session by a few unlucky passes.
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
WINDOW = 12
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
    tokens: int
    draft_s: float
    target_s: float
    ran_out: bool = False  # the accepted path ended at a leaf of the tree


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
        self._passes: dict[int, deque[_Pass]] = {}
        self._last_used: dict[int, int] = {}  # K -> the pass count when it was last observed
        self._pass_count = 0
        self.current = initial if initial is not None else self.best()

    # -- the model ---------------------------------------------------------------------
    def expected_tokens(self, k: int) -> float:
        measured = self._measured_mean(k, "tokens")
        if measured is not None:
            return measured
        return min(1.0 + self.beta * math.log2(1 + k), min(k, self.max_depth) + 1.0)  # K nodes: at most K + 1 tokens

    def _measured_mean(self, k: int, part: str) -> float | None:
        """The mean of ``part`` ("tokens", "draft_s", "target_s") over K's passes, once measured; else None."""
        if not self._measured(k):
            return None
        runs = self._passes[k]
        return sum(getattr(r, part) for r in runs) / len(runs)

    def predicted_seconds(self, k: int) -> float:
        if self._measured(k):
            return self._measured_mean(k, "draft_s") + self._measured_mean(k, "target_s")
        return self.draft_ratio * self.calibration.draft(self.method, k) + self.target_ratio * self.calibration.target(k)

    def chain_share(self, k: int) -> float:
        """c(K): the share of K's recent passes that ran out times the share of the tree their
        accepted paths took (0 where none were run; see the module's docstring)."""
        runs = self._passes.get(k, ())
        if not runs:
            return 0.0
        ran_out = sum(r.ran_out for r in runs) / len(runs)
        taken = sum(r.tokens - 1.0 for r in runs) / len(runs) / k
        return ran_out * min(taken, 1.0)

    def _bigger_could_pay(self, k: int) -> bool:
        """Could 2K beat the measured K?  Its optimistic bound: one more doubling's tokens (beta, or
        a chain deeper by the chain share, where K's passes ran out), K's measured drafting, the
        calibrated target pass at 2K (see the module's docstring)."""
        draft_s, tokens = self._measured_mean(k, "draft_s"), self.expected_tokens(k)
        gain = max(self.beta, self.chain_share(k) * (tokens - 1.0))
        bound = (tokens + gain) / max(draft_s + self.target_ratio * self.calibration.target(2 * k), 1e-9)
        return bound > self.throughput(k)

    def _renew_bigger(self, k: int) -> None:
        """Where K's passes took chains of most of the tree and ran out, drop 2K's measurement unless
        it is recent (see the module's docstring), so that 2K is judged by the bound and measured again."""
        bigger = 2 * k
        if bigger not in self._passes or self.chain_share(k) < 0.5:
            return
        if self._pass_count - self._last_used[bigger] >= WINDOW:
            del self._passes[bigger], self._last_used[bigger]

    def throughput(self, k: int) -> float:
        return self.expected_tokens(k) / max(self.predicted_seconds(k), 1e-9)

    def best(self) -> int:
        return max(self.candidates, key=lambda k: (self.throughput(k), -k))

    def _measured(self, k: int) -> bool:
        return len(self._passes.get(k, ())) >= MEASURED_PASSES

    def _choose(self) -> int:
        if not self._measured(self.current):
            return self.current  # finish measuring the budget being tried
        best = self.best()
        if self._measured(best):
            self._renew_bigger(best)
            smaller, bigger = best // 2, best * 2
            if smaller in self.candidates and not self._measured(smaller):
                if self.throughput(smaller) >= EXPLORE_MARGIN * self.throughput(best):
                    return smaller
            if bigger in self.candidates and not self._measured(bigger):
                if self.throughput(bigger) >= EXPLORE_MARGIN * self.throughput(best) or self._bigger_could_pay(best):
                    return bigger
        return best

    # -- learning ----------------------------------------------------------------------
    def observe(self, budget: int, tokens: float, draft_s: float, target_s: float, ran_out: bool = False) -> None:
        """One pass at ``budget``: its tokens, seconds, and whether its accepted path ended at a leaf."""
        self._passes.setdefault(budget, deque(maxlen=WINDOW)).append(_Pass(tokens, draft_s, target_s, ran_out))
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
        """Drop the measurements of budgets unused for :data:`STALE_PASSES` passes.

        A few unlucky passes at a K (boilerplate just before EOS) would otherwise rule it
        out for the whole session; forgotten, it is judged by the curve again and
        re-measured if the curve makes it worth trying."""
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
