"""Measured decoding speed of each draft in each setting: what ``--draft auto`` weighs the self
draft against a registered sibling by, once both have run here.

A reply's decoding speed is the product the issue's cost model predicts from its parts,

    tokens/s = E[tokens per pass] / (draft seconds + target seconds per pass),

measured whole: every finished reply adds its new tokens and its decode seconds (wall time less
the prefill) to a running total under a key that names what those seconds depend on besides the
prompt -- target, draft, precisions, device, placement, method, budget mode, greedy or sampled,
threads, the processor and the code (:func:`~specchat.common.system.measurement_identity`).
The totals decay (at most :data:`WINDOW_TOKENS` tokens are kept), so that a slower disk or a
busier machine moves the choice.  A draft's speed counts once :data:`MIN_TOKENS`
tokens were measured in the same setting.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from specchat.app.config import RunConfig
from specchat.common.files import atomic_write
from specchat.common.paths import config_file
from specchat.common.system import measurement_identity
from specchat.engine.config import GenerationConfig
from specchat.engine.events import GenerationStats
from specchat.model.placement import OffloadPlan, resolve_quant
from specchat.weights.precision import dtype_name

MIN_TOKENS = 64  # a draft's measured speed counts from this many decoded tokens on
WINDOW_TOKENS = 2048  # the totals are scaled down to this many tokens: newer replies weigh more


def speed_file() -> Path:
    """Kept with the config and the calibration: the speeds belong to this machine."""
    return config_file().parent / "draft_speeds.json"


def speed_key(
    target: str, draft: str, plan: OffloadPlan, dtype: torch.dtype, device: torch.device, run: RunConfig,
    generation: GenerationConfig,
) -> str:
    """Everything a reply's decoding speed depends on but the prompt."""
    quant = "" if draft.startswith("self:") else f" {run.draft_quant}"  # a sibling's weights on the CPU
    return (
        f"{target} draft={draft}{quant} quant={resolve_quant(run.quant)} dtype={dtype_name(dtype)} device={device.type} "
        f"offload={plan.mode}:{plan.resident_layers}+{plan.host_layers} store={run.store or '-'} "
        f"method={generation.method} budget={generation.budget or 'auto'} "
        f"{'sampled' if generation.temperature > 0 else 'greedy'} threads={torch.get_num_threads()} {measurement_identity()}"
    )


def record_speed(path: Path, key: str, stats: GenerationStats) -> None:
    """Add one reply's decoding to ``key``'s totals (atomic replace; other keys kept)."""
    seconds = stats.wall_s - stats.prefill_s
    if stats.method == "ar" or stats.new_tokens <= 0 or seconds <= 0:
        return
    everything = _read(path)
    entry = everything.get(key) if isinstance(everything.get(key), dict) else {}
    tokens = float(entry.get("tokens", 0)) + stats.new_tokens
    total_s = float(entry.get("seconds", 0)) + seconds
    if tokens > WINDOW_TOKENS:  # the older replies' share shrinks; the ratio is kept
        total_s, tokens = total_s * WINDOW_TOKENS / tokens, float(WINDOW_TOKENS)
    everything[key] = {"tokens": tokens, "seconds": total_s}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(everything, indent=1) + "\n")


def measured_speed(path: Path, key: str) -> float | None:
    """Tokens per second of decoding measured under ``key``; None before :data:`MIN_TOKENS` tokens."""
    entry = _read(path).get(key)
    try:
        tokens, seconds = float(entry["tokens"]), float(entry["seconds"])
    except (TypeError, KeyError, ValueError):
        return None
    return tokens / seconds if tokens >= MIN_TOKENS and seconds > 0 else None


def _read(path: Path) -> dict:
    """The file's keys; an absent or damaged file reads as empty (and is rewritten whole on the next record)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}
