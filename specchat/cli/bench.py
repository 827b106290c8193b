"""The `bench` command: validate, load once, run interleaved (logging each run), render."""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from specchat.bench.sweep import BenchConfig, Row, configurations, load_prompts, run_bench
from specchat.bench.log import LogWriter, read_log, stream_rate
from specchat import METHODS, ConfigError, GenerationConfig, InputError, RunConfig, load, resolve_device
from specchat.cli.run import stderr_progress
from specchat.app.calibration import ensure_calibration
from specchat.cli.views import bench_json, bench_plot, bench_table


@dataclass(frozen=True)
class BenchOutput:
    as_json: bool = False
    plot: Path | None = None  # PNG of tokens/pass and tokens/s against the budget
    log: Path | None = None  # JSONL of every run; an existing log of the same setup is resumed


def run_bench_command(
    settings: RunConfig,
    prompts_file: Path | None,
    n: int,
    methods: tuple[str, ...],
    budgets: tuple[int | None, ...],
    temperatures: tuple[float, ...],
    top_p: float,
    max_new_tokens: int,
    seed: int,
    output: BenchOutput,
    calibrate: bool = False,
    full_growth: bool = False,
) -> None:
    needs_draft = _validate(settings, methods, budgets, temperatures, n, top_p, max_new_tokens)
    _check_plot_backend(output.plot)
    bench = BenchConfig(load_prompts(prompts_file, n), methods, budgets, temperatures, top_p, max_new_tokens, seed, full_growth)
    keys = configurations(bench)
    log = LogWriter(output.log, _log_setup(settings, bench), keys) if output.log else None
    skip = frozenset(log.done_prompts()) if log else frozenset()
    if log and skip >= set(range(len(bench.prompts))):
        log.close()
        print(f"{output.log}: every prompt is already measured", file=sys.stderr)
        render_log_command(output.log, output)
        return
    # "ar" needs no draft, but the other methods do: load one only if some method uses it.
    # The budget `auto` and the draft width `auto` run on a calibration: loaded without one, then
    # ensured here, once -- so every run of a sweep has the same costs, saved or measured.
    loaded = replace(settings, method="specexec") if needs_draft else _without_draft(settings)
    pipeline = load(loaded, stderr_progress, calibrate=False)
    if (calibrate or None in budgets or settings.draft_batch is None) and pipeline.draft is not None:
        ensure_calibration(pipeline, settings, stderr_progress, force=calibrate)
    bandwidths = [_stream_bandwidth(pipeline, log)]
    rows, reads = _run_measured(pipeline, bench, settings, log, skip, keys, output)
    bandwidths.append(_stream_bandwidth(pipeline, log))
    setup = _resolved_setup(pipeline, settings, bench)
    if log:
        log.pipeline(setup)
        log.close()
        logged = read_log(output.log)  # the resumed prompts too
        rows, (bandwidth, source) = logged.rows(), stream_rate(logged.reads, logged.bandwidths)
        setup["prompts"] = len(logged.complete_prompts())
    else:
        bandwidth, source = stream_rate(reads, [b for b in bandwidths if b])
    _render(rows, setup | {"stream_measured": source}, bandwidth, output)


def _validate(settings: RunConfig, methods, budgets, temperatures, n: int, top_p: float, max_new_tokens: int) -> bool:
    """Refuse a sweep that cannot run, before anything loads; returns whether it needs a draft."""
    if not methods or not temperatures:
        raise ConfigError("--methods and --temperatures need at least one value")
    for method in methods:
        if method not in METHODS:
            raise ConfigError(f"--methods: unknown method {method!r}", f"use {', '.join(METHODS)}")
    if n < 1 or not budgets or any(b is not None and b < 1 for b in budgets) or not all(t >= 0 for t in temperatures):
        raise ConfigError("--n and --budgets must be >= 1 and --temperatures >= 0")
    needs_draft = any(m != "ar" for m in methods)
    if needs_draft and settings.draft == "none":
        raise ConfigError(
            f"--methods {','.join(methods)} needs a draft model, but the draft is 'none'",
            "give --draft NAME|auto, or bench --methods ar only",
        )
    try:
        GenerationConfig(top_p=top_p, max_new_tokens=max_new_tokens)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return needs_draft


def _run_measured(pipeline, bench: BenchConfig, settings: RunConfig, log, skip, keys, output: BenchOutput):
    """Every configuration on every prompt not yet measured, with a progress bar: (rows, reads per run)."""
    counters = getattr(pipeline.engine.target.layer_source, "read_counters", None)
    reads: list[tuple[int, float]] = []
    last = counters() if counters else (0, 0.0)
    total = (len(bench.prompts) - len(skip & set(range(len(bench.prompts))))) * len(keys)
    if skip:
        print(f"resuming {output.log}: {len(skip)} prompt(s) already measured", file=sys.stderr)
    print(
        f"benchmarking: {total // len(keys)} prompt(s) x {len(keys)} configuration(s) = {total} runs"
        + (f"; every finished run is appended to {output.log}" if log else "; --log FILE keeps them if the sweep is cut short"),
        file=sys.stderr,
    )
    with Progress(console=Console(stderr=True), transient=True, disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task("benchmarking", total=total)

        def on_run(record) -> None:
            nonlocal last
            if log:
                log.run(record)
            if counters:
                now = counters()
                reads.append((now[0] - last[0], now[1] - last[1]))
                if log:
                    log.reads(*reads[-1])
                last = now
            progress.advance(task)

        rows = run_bench(pipeline, bench, settings.generation(), on_run, skip)
    return rows, reads


def render_log_command(path: Path, output: BenchOutput) -> None:
    """`bench --from-log`: the tables (and plot) of a logged sweep, over the prompts it completed."""
    _check_plot_backend(output.plot)
    log = read_log(path)
    complete = log.complete_prompts()
    if not complete:
        raise InputError(f"{path}: no prompt has finished every configuration yet", "let the sweep run longer")
    setup = dict(log.resolved or log.setup) | {"prompts": len(complete), "stream_measured": log.stream_source}
    _render(log.rows(), setup, log.stream_bytes_per_s, output)


def _render(rows: list[Row], setup: dict, bandwidth: float | None, output: BenchOutput) -> None:
    if output.as_json:
        bench_json(rows, setup, sys.stdout, bandwidth)
    else:
        print(" | ".join(f"{k}: {v}" for k, v in setup.items() if v is not None), file=sys.stderr)
        bench_table(rows, sys.stdout, bandwidth, setup.get("stream_measured"))
    if output.plot:
        bench_plot(rows, output.plot, title=f"{setup.get('target', '')}, {setup.get('prompts')} prompts")
        print(f"plot written to {output.plot}", file=sys.stderr)


def _check_plot_backend(plot: Path | None) -> None:
    if plot is None:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ConfigError("--plot needs matplotlib, which is not installed", "pip install 'specchat[plot]'") from exc
    if plot.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise ConfigError(f"--plot {plot}: unknown image type {plot.suffix!r}", "end the file name in .png, .svg or .pdf")
    if not plot.resolve().parent.is_dir():
        raise ConfigError(f"--plot {plot}: folder {plot.resolve().parent} does not exist", "create it or choose another path")


def _log_setup(settings: RunConfig, bench: BenchConfig) -> dict:
    """What a log's runs depend on: a resumed log must match it exactly."""
    prompts = hashlib.sha256("\x00".join(bench.prompts).encode()).hexdigest()[:16]
    setup = {
        "target": settings.model, "draft": settings.draft, "quant": settings.quant, "draft_quant": settings.draft_quant,
        "offload": settings.offload, "ram_budget": settings.ram_budget, "max_depth": settings.max_depth,
        "draft_batch": settings.draft_batch if settings.draft_batch is not None else "auto", "prompts": len(bench.prompts), "prompts_sha256": prompts,
        "max_new_tokens": bench.max_new_tokens, "top_p": bench.top_p, "seed": bench.seed,
    }
    device = resolve_device(settings.device).type
    if device != "cpu":  # absent on a CPU, so that logs written without the key still resume
        setup["device"] = device
    if bench.full_growth:  # (absent when off, likewise)
        setup["full_growth"] = True
    return setup


def _stream_bandwidth(pipeline, log: LogWriter | None) -> float | None:
    """The streamed target's layer files read alone (None when nothing streams)."""
    measure = getattr(pipeline.engine.target.layer_source, "measure_stream_bandwidth", None)
    bandwidth = measure() if measure else None
    if bandwidth and log:
        log.bandwidth(bandwidth)
    return bandwidth


def _resolved_setup(pipeline, settings: RunConfig, bench: BenchConfig) -> dict:
    """What actually ran: model names and placement as resolved by the pipeline."""
    return {
        "target": pipeline.target_name,
        "draft": pipeline.draft_name,
        "offload": pipeline.offload.reason,
        "quant": settings.quant,
        "draft_quant": settings.draft_quant,
        "prompts": len(bench.prompts),
        "max_new_tokens": bench.max_new_tokens,
        "top_p": bench.top_p,
    } | ({"full_growth": True} if bench.full_growth else {})


def _without_draft(settings: RunConfig) -> RunConfig:
    return replace(settings, draft="none")
