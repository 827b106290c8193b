"""What an engine knows about the cost of its passes, in one place.

:class:`PassCosts` holds the calibration (measured target pass and draft growth seconds,
obtained on first need from a provider the application gives -- load the saved one or measure
and save -- else measured here), the ``--budget auto`` tuner of each (method, temperature,
top-p), and the running means this session's own passes measured: draft step seconds by width
and target pass seconds by budget (SpecExec's adaptive stop weighs them) and the ratio of
measured to calibrated draft seconds (``--draft-batch auto`` rescales its step costs by it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from specchat.engine.autobudget.costmodel import CANDIDATES, PRIOR_BETA, Calibration, CostModelTuner, interpolate
from specchat.engine.autobudget.measure import measure_calibration
from specchat.model.lm import LanguageModel
from specchat.speculation.growth import GrowthParams

WIDTHS = (1, 2, 4, 8, 16, 32, 64)  # draft step widths auto width chooses from
RUNNING_WEIGHT = 0.3  # of a new pass in the running means

# (max_depth, growth width) -> the calibration for these settings
CalibrationProvider = Callable[[int, int], Calibration]


def running_mean(previous: float | None, sample: float, weight: float = RUNNING_WEIGHT) -> float:
    return sample if previous is None else (1 - weight) * previous + weight * sample


@dataclass
class PassCosts:
    calibration: Calibration | None = None
    provider: CalibrationProvider | None = None  # None: measured on the engine's own models when needed
    tuners: dict[tuple[str, float, float], CostModelTuner] = field(default_factory=dict)
    draft_step_s: dict[int, float] = field(default_factory=dict)  # by draft width, SpecExec passes only
    target_pass_s: dict[int, float] = field(default_factory=dict)  # by budget
    draft_scale: float = 1.0  # measured / calibrated draft seconds (auto width)
    largest_budget: int = CANDIDATES[-1]  # the largest tree --budget auto may pick (the RAM's limit)
    prior_beta: float = PRIOR_BETA  # the tuner's first guess of tokens per doubling of the budget (the draft's kind)

    def use(self, calibration: Calibration | None) -> None:
        """Replace the calibration; the tuners built on the old one are dropped."""
        self.calibration = calibration
        self.tuners.clear()

    def ensure(self, target: LanguageModel, draft: LanguageModel, max_depth: int, width: int) -> Calibration:
        """The calibration, obtained now if there is none yet."""
        if self.calibration is None:
            if self.provider is not None:
                self.use(self.provider(max_depth, width))
            else:
                self.use(measure_calibration(target, draft, max_depth, width))
        return self.calibration

    def tuner(self, method: str, temperature: float, top_p: float, max_depth: int) -> CostModelTuner:
        """The ``--budget auto`` tuner of this method and sampling mode (acceptance differs with each);
        needs the calibration (:meth:`ensure`)."""
        key = (method, temperature, top_p if temperature > 0 else 1.0)
        if key not in self.tuners:
            self.tuners[key] = CostModelTuner(self.calibration, method, max_depth, prior_beta=self.prior_beta, largest=self.largest_budget)
        return self.tuners[key]

    def growth(self, base: GrowthParams, auto_width: bool) -> GrowthParams:
        """``base`` with the measured costs SpecExec's adaptive stop and auto width need."""
        return replace(
            base,
            draft_step_s=self.draft_step_s.get(base.batch),
            target_pass_s=self.target_pass_s.get(base.budget),
            width_costs=self.width_costs(base.budget) if auto_width else (),
        )

    def width_costs(self, budget: int) -> tuple[tuple[int, float], ...]:
        """(width, predicted seconds of a draft forward over that many nodes): the calibrated step
        times, interpolated and rescaled by what this session's passes measured."""
        table = self.calibration.draft_step_s if self.calibration is not None else {}
        if not table:
            return ()
        return tuple((w, self.draft_scale * interpolate(table, w)) for w in WIDTHS if w <= max(budget, 1))

    def observe_draft(self, width: int, draft_s: float, forwards: int, predicted_s: float, times_steps: bool) -> None:
        """One tree's growth: ``draft_s`` seconds over ``forwards`` forwards; ``predicted_s`` what the
        step costs predicted for them (auto width; 0 otherwise)."""
        if times_steps:
            self.draft_step_s[width] = running_mean(self.draft_step_s.get(width), draft_s / max(forwards, 1))
        if predicted_s > 0:  # predicted_s used the old scale: measured / calibrated = scale * measured / predicted
            self.draft_scale = running_mean(self.draft_scale, self.draft_scale * draft_s / predicted_s)

    def observe_target(self, budget: int, target_s: float) -> None:
        self.target_pass_s[budget] = running_mean(self.target_pass_s.get(budget), target_s)
