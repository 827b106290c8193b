"""`specchat bench`: methods x budgets x temperatures, interleaved prompt by prompt in one process.

Interleaving (every configuration runs on prompt 1, then every configuration on
prompt 2, ...) keeps the ratios honest on a noisy machine: a slow minute hurts
all configurations alike.  Each run starts from empty caches so every
configuration pays the same prefill.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from specchat.engine.config import EngineError, GenerationConfig
from specchat.common.errors import InputError
from specchat.engine.events import DoneEvent, GenerationStats

DEFAULT_PROMPTS = Path(__file__).resolve().parents[1] / "data" / "mt_bench.jsonl"


@dataclass(frozen=True)
class BenchConfig:
    prompts: tuple[str, ...]
    methods: tuple[str, ...]
    budgets: tuple[int | None, ...]  # None: --budget auto
    temperatures: tuple[float, ...]
    top_p: float
    max_new_tokens: int
    seed: int
    full_growth: bool = False  # SpecExec: grow until the tree is the draft's best K nodes (no adaptive stop)


@dataclass(frozen=True)
class RunRecord:
    """One finished generation of a sweep: which prompt (by index) and configuration."""

    prompt: int
    method: str
    budget: int | None  # None: auto; 0 for AR
    temperature: float
    stats: GenerationStats


@dataclass
class Row:
    method: str
    budget: int | None  # None: auto; 0 for AR
    temperature: float
    runs: list[GenerationStats] = field(default_factory=list)

    def total(self, name: str) -> float:
        return sum(getattr(stats, name) for stats in self.runs)

    @property
    def tokens_per_pass(self) -> float:
        return self.total("new_tokens") / max(self.total("target_passes"), 1)

    @property
    def tokens_per_s(self) -> float:
        decode = self.total("wall_s") - self.total("prefill_s")
        return self.total("new_tokens") / max(decode, 1e-9)

    @property
    def tree_nodes_per_pass(self) -> float | None:
        """None for AR, and where a logged run did not record its tree sizes."""
        if self.method == "ar" or not all(stats.tree_nodes for stats in self.runs):
            return None
        return self.per_pass("tree_nodes")

    def per_pass(self, name: str) -> float:
        return self.total(name) / max(self.total("target_passes"), 1)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "budget": "auto" if self.budget is None else self.budget,
            "temperature": self.temperature,
            "prompts": len(self.runs),
            "new_tokens": int(self.total("new_tokens")),
            "target_passes": int(self.total("target_passes")),
            "tokens_per_pass": self.tokens_per_pass,
            "tokens_per_s": self.tokens_per_s,
            "target_s_per_pass": self.per_pass("target_s"),
            "draft_s_per_pass": self.per_pass("draft_s"),
            "tree_nodes_per_pass": self.tree_nodes_per_pass,
            "read_bytes_per_pass": self.per_pass("decode_read_bytes"),
        }


def load_prompts(path: Path | None, n: int) -> tuple[str, ...]:
    """First turns of an MT-Bench style JSONL (``{"turns": [...]}`` or ``{"prompt": ...}``)."""
    path = path or DEFAULT_PROMPTS
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as exc:
        raise InputError(f"cannot read prompts file {path}: {exc.strerror}", "check the --prompts path") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"prompts file {path} is not UTF-8 text", "save it as UTF-8") from exc
    prompts = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            prompt = record["turns"][0] if "turns" in record else record["prompt"]
            if not isinstance(prompt, str) or not prompt.strip():
                raise TypeError("not a non-empty string")
            prompts.append(prompt)
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
            raise InputError(
                f"{path}, line {number}: not a JSON object with \"turns\" or \"prompt\"", "fix the prompts file"
            ) from exc
    if not prompts:
        raise InputError(f"prompts file {path} is empty", "give a JSONL file with at least one prompt")
    return tuple(prompts[:n])


def configurations(bench: BenchConfig) -> list[tuple[str, int | None, float]]:
    """(method, budget, temperature) in run order; AR once per temperature."""
    out = []
    for temperature in bench.temperatures:
        for method in bench.methods:
            for budget in bench.budgets if method != "ar" else (0,):
                out.append((method, budget, temperature))
    return out


def run_bench(
    pipeline,
    bench: BenchConfig,
    base: GenerationConfig,
    on_run: Callable[[RunRecord], None],
    skip_prompts: frozenset[int] = frozenset(),
) -> list[Row]:
    """Every configuration on prompt 0, then on prompt 1, ...; ``skip_prompts`` (indices) are not run."""
    rows = {key: Row(*key) for key in configurations(bench)}
    engine = pipeline.engine
    for index, prompt in enumerate(bench.prompts):
        if index in skip_prompts:
            continue
        prompt_ids = pipeline.encode_chat([{"role": "user", "content": prompt}])
        for method, budget, temperature in rows:
            engine.reset()
            config = GenerationConfig(
                method=method,
                budget=None if budget is None else max(budget, 1),
                max_depth=base.max_depth,
                draft_batch=base.draft_batch,
                temperature=temperature,
                top_p=bench.top_p if temperature > 0 else 1.0,
                seed=bench.seed + index,
                max_new_tokens=bench.max_new_tokens,
                adaptive=base.adaptive and not bench.full_growth,
            )
            try:
                done = [e for e in engine.generate(prompt_ids, config) if isinstance(e, DoneEvent)][-1]
            except EngineError as exc:
                raise InputError(f"prompt {index + 1}: {exc}", "remove it from --prompts or lower --max-new-tokens") from exc
            rows[(method, budget, temperature)].runs.append(done.stats)
            on_run(RunRecord(index, method, budget, temperature, done.stats))
    return list(rows.values())


def physical_limit(row: Row, stream_bytes_per_s: float | None) -> float | None:
    """tokens/s if every pass cost only its stream: (tokens/pass) x (bandwidth) / (bytes streamed per pass)."""
    per_pass = row.per_pass("decode_read_bytes")
    if not stream_bytes_per_s or per_pass <= 0:
        return None
    return row.tokens_per_pass * stream_bytes_per_s / per_pass


def ratios_to_ar(rows: list[Row]) -> dict[tuple[str, int | None, float], float]:
    ar = {row.temperature: row.tokens_per_s for row in rows if row.method == "ar"}
    return {
        (row.method, row.budget, row.temperature): row.tokens_per_s / ar[row.temperature]
        for row in rows
        if row.temperature in ar and ar[row.temperature] > 0
    }
