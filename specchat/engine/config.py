"""What one reply asks of the engine: :class:`GenerationConfig`, frozen and validated where it is
built, and :class:`EngineError` for requests the engine cannot serve."""

from __future__ import annotations

from dataclasses import dataclass

from specchat.speculation.growth import GrowthParams
from specchat.speculation.sampling import SamplingParams
from specchat.speculation.speculator import SPECULATORS

METHODS = (*SPECULATORS, "ar")
DEFAULT_DRAFT_BATCH = 8  # nodes per draft step when the width is fixed (or auto has no step costs yet)


class EngineError(ValueError):
    """A request the engine cannot serve (empty prompt, context overflow, ...)."""


MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class GenerationConfig:
    method: str = "specexec"
    budget: int | None = 64  # tree nodes per target pass (SpecExec K), root excluded; None = auto (per pass, cost model)
    max_depth: int = 32
    draft_batch: int | None = DEFAULT_DRAFT_BATCH  # nodes per draft forward; None = auto (per step, calibrated costs)
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    adaptive: bool = True  # SpecExec: stop growing when a draft step costs more than it adds

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("budget", "max_depth", "draft_batch", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1 or value is None and name in ("max_depth", "max_new_tokens"):
                raise ValueError(f"{name} must be >= 1, got {value}")
        SamplingParams(self.temperature, self.top_p)  # validates both
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be a whole number from 0 to {MAX_SEED} (what torch's generator takes), got {self.seed}")

    @property
    def auto_budget(self) -> bool:
        return self.budget is None

    @property
    def auto_width(self) -> bool:
        return self.draft_batch is None

    @property
    def width(self) -> int:
        """The draft width a step starts from (auto width rescales it per step)."""
        return self.draft_batch if self.draft_batch is not None else DEFAULT_DRAFT_BATCH

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p)

    @property
    def growth(self) -> GrowthParams:
        """The tree's shape for one pass (an auto budget is resolved per pass before growing)."""
        if self.budget is None:
            raise ValueError("an auto budget has no fixed tree size; resolve it per pass")
        return GrowthParams(self.budget, self.max_depth, self.width)
