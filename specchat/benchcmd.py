"""The `bench` command: validate, load once, run interleaved, render."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from rich.progress import Progress

from .bench import AUTO, BenchConfig, configurations, load_prompts, run_bench
from .config import RunConfig
from .engine import METHODS, GenerationConfig
from .errors import ConfigError
from .oneshot import stderr_progress
from .pipeline import ensure_calibration, load_pipeline
from .views import bench_json, bench_table


def run_bench_command(
    settings: RunConfig,
    prompts_file: Path | None,
    n: int,
    methods: tuple[str, ...],
    budgets: tuple[int, ...],
    temperatures: tuple[float, ...],
    top_p: float,
    max_new_tokens: int,
    seed: int,
    as_json: bool,
    calibrate: bool = False,
) -> None:
    for method in methods:
        if method not in METHODS:
            raise ConfigError(f"--methods: unknown method {method!r}", f"use {', '.join(METHODS)}")
    if n < 1 or not budgets or any(b < 1 and b != AUTO for b in budgets) or any(t < 0 for t in temperatures):
        raise ConfigError("--n and --budgets must be >= 1 and --temperatures >= 0")
    try:
        GenerationConfig(top_p=top_p, max_new_tokens=max_new_tokens)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    bench = BenchConfig(load_prompts(prompts_file, n), methods, budgets, temperatures, top_p, max_new_tokens, seed)
    # "ar" needs no draft, but the other methods do: load one only if some method uses it.
    needs_draft = any(m != "ar" for m in methods)
    pipeline = load_pipeline(settings if needs_draft else _without_draft(settings), stderr_progress)
    if calibrate and pipeline.draft is not None:
        ensure_calibration(pipeline, replace(settings, budget=None), stderr_progress, force=True)
    bandwidths = [_stream_bandwidth(pipeline)]
    total = len(bench.prompts) * len(configurations(bench))
    with Progress(console=None, transient=True, disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task("benchmarking", total=total)
        rows = run_bench(pipeline, bench, settings.generation(), lambda: progress.advance(task))
    bandwidths.append(_stream_bandwidth(pipeline))
    measured = [b for b in bandwidths if b]
    stream_bytes_per_s = sum(measured) / len(measured) if measured else None  # before and after the runs
    setup = {
        "target": pipeline.target_name,
        "draft": pipeline.draft_name,
        "offload": pipeline.offload.reason,
        "quant": settings.quant,
        "draft_quant": settings.draft_quant,
        "prompts": len(bench.prompts),
        "max_new_tokens": max_new_tokens,
        "top_p": top_p,
    }
    if as_json:
        bench_json(rows, setup, sys.stdout, stream_bytes_per_s)
    else:
        print(" | ".join(f"{k}: {v}" for k, v in setup.items()), file=sys.stderr)
        bench_table(rows, sys.stdout, stream_bytes_per_s)


def _stream_bandwidth(pipeline) -> float | None:
    """The streamed target's layer files read alone (None when nothing streams)."""
    measure = getattr(pipeline.engine.target.layer_source, "measure_stream_bandwidth", None)
    return measure() if measure else None


def _without_draft(settings: RunConfig) -> RunConfig:
    return replace(settings, draft="none")
