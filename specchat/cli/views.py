"""Rendering for the terminal: tables and progress (rich).  Nothing here computes results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.table import Table

from specchat.bench.sweep import Row, physical_limit, ratios_to_ar


def prefill_line(event) -> str:
    """A :class:`PrefillEvent` as a progress line."""
    return f"prefill: {event.done} of {event.total} prompt tokens ({100 * event.done // event.total}%)"


def bench_table(rows: list[Row], out: TextIO, stream_bytes_per_s: float | None = None, stream_measured: str | None = None) -> None:
    ratios = ratios_to_ar(rows)
    table = Table(title="specchat bench", title_justify="left")
    headers = ("method", "budget", "temp", "prompts", "nodes/pass", "tok/pass", "tok/s", "vs AR", "target s/pass", "draft s/pass", "MB read/pass", "limit tok/s", "of limit")
    for header in headers:
        table.add_column(header, justify="left" if header == "method" else "right")
    for row in rows:
        ratio = ratios.get((row.method, row.budget, row.temperature))
        table.add_row(
            row.method,
            ("auto" if row.budget is None else str(row.budget)) if row.method != "ar" else "-",
            f"{row.temperature:g}",
            str(len(row.runs)),
            f"{row.tree_nodes_per_pass:.0f}" if row.tree_nodes_per_pass is not None else "-",
            f"{row.tokens_per_pass:.2f}",
            f"{row.tokens_per_s:.2f}",
            f"{ratio:.2f}x" if ratio is not None else "-",
            f"{row.per_pass('target_s'):.2f}",
            f"{row.per_pass('draft_s'):.2f}",
            f"{row.per_pass('decode_read_bytes') / 1e6:.0f}",
            *_limit_cells(row, stream_bytes_per_s),
        )
    console = Console(file=out, width=160)
    console.print(table)
    if stream_bytes_per_s:
        console.print(
            f"limit: tokens/s if a pass cost only its stream = (tok/pass) x {stream_bytes_per_s / 1e9:.2f} GB/s "
            f"({stream_measured or 'measured stream'}) / (bytes read per pass)"
        )


def _limit_cells(row: Row, stream_bytes_per_s: float | None) -> tuple[str, str]:
    limit = physical_limit(row, stream_bytes_per_s)
    if limit is None:
        return "-", "-"
    return f"{limit:.2f}", f"{row.tokens_per_s / limit:.0%}"


def bench_json(rows: list[Row], setup: dict, out: TextIO, stream_bytes_per_s: float | None = None) -> None:
    ratios = ratios_to_ar(rows)
    payload = {
        "setup": setup | {"stream_bytes_per_s": stream_bytes_per_s},
        "rows": [
            row.to_dict()
            | {"ratio_to_ar": ratios.get((row.method, row.budget, row.temperature))}
            | _limit_json(row, stream_bytes_per_s)
            for row in rows
        ],
    }
    out.write(json.dumps(payload, indent=1) + "\n")


def _limit_json(row: Row, stream_bytes_per_s: float | None) -> dict:
    limit = physical_limit(row, stream_bytes_per_s)
    return {"physical_limit_tok_s": limit, "of_limit": row.tokens_per_s / limit if limit else None}


def bench_plot(rows: list[Row], path: Path, title: str = "") -> None:
    """Tokens/pass and tokens/s against the budget: one line per (method, temperature).

    Fixed budgets are points on a log2 axis; ``auto`` and AR have no fixed budget,
    so they are drawn as horizontal lines at their measured values.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    figure, (per_pass, per_s) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[tuple[str, float], list[Row]] = {}
    for row in rows:
        series.setdefault((row.method, row.temperature), []).append(row)
    for index, ((method, temperature), group) in enumerate(series.items()):
        colour = f"C{index}"
        label = f"{method} t={temperature:g}"
        fixed = sorted((r for r in group if r.budget is not None and method != "ar"), key=lambda r: r.budget)
        for axis, value in ((per_pass, lambda r: r.tokens_per_pass), (per_s, lambda r: r.tokens_per_s)):
            if fixed:
                axis.plot([r.budget for r in fixed], [value(r) for r in fixed], "o-", color=colour, label=label)
            for r in group:
                if method == "ar" or r.budget is None:
                    style = ":" if method == "ar" else "--"
                    name = label if method == "ar" else f"{label} auto"
                    axis.axhline(value(r), linestyle=style, color=colour, label=name)
    for axis, ylabel in ((per_pass, "tokens per target pass"), (per_s, "tokens / s")):
        axis.set_xscale("log", base=2)
        axis.set_ylim(bottom=0)
        axis.set_xlabel("budget (tree nodes per pass)")
        axis.set_ylabel(ylabel)
        axis.grid(True, alpha=0.3)
    per_s.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def detect_report(facts: dict, advice: dict, out: TextIO, calibrated: list[dict] | None = None) -> None:
    console = Console(file=out, width=200, highlight=False, soft_wrap=True)
    cpu = facts["cpu"]
    console.print(f"CPU     {cpu['name']}: {cpu['cores']} cores / {cpu['threads']} threads; {', '.join(cpu['vector_extensions']) or 'no vector extensions found'}")
    bf16 = f", bfloat16 {cpu['bf16_gflops']:.0f}" if cpu.get("bf16_gflops") else ""
    console.print(f"        matrix products: float32 {cpu['fp32_gflops']:.0f} GFLOP/s{bf16}; {cpu['compute_dtype_reason']}", markup=False)
    console.print(f"RAM     {_gb(facts['ram_total'])} total, {_gb(facts['ram_available'])} available")
    if not facts["gpus"]:
        console.print("GPU     none (torch sees no CUDA device)")
    for gpu in facts["gpus"]:
        console.print(
            f"GPU     {gpu['name']} (cc {gpu['compute_capability']}): {_gb(gpu['vram_free'])} free of {_gb(gpu['vram_total'])}; "
            f"pinned host->device {gpu['pinned_h2d_gbps']:.1f} GB/s"
        )
    io = "direct I/O" if facts["disk_direct_io"] else "buffered reads + DONTNEED (no O_DIRECT here)"
    console.print(f"Disk    {_gb(facts['disk_free'])} free at {facts['store_dir']}; reads {facts['disk_read_gbps']:.2f} GB/s ({io})")
    console.print("Recommended:")
    for key, item in advice.items():
        console.print(f"  {key:8} {item['value']:22} {item['reason']}", markup=False)
    if not calibrated:
        console.print("--budget auto: not calibrated yet (`specchat setup` measures the pass times it needs)", markup=False)
    for choice in calibrated or ():
        console.print(f"--budget auto for {choice['settings']}:", markup=False)
        console.print(f"  starts at {choice['reason']}", markup=False)


def models_table(rows: list[dict], out: TextIO) -> None:
    table = Table(title="specchat models", title_justify="left")
    for header in ("target", "params", "16-bit", "4-bit", "present", "runs here", "drafts"):
        table.add_column(header)
    for row in rows:
        drafts = ", ".join(
            [f"{d['name']}{' (present)' if d['present'] else ''}" for d in row["drafts"]]
            + ([f"{row['self_draft']['name']} (<= {_gb(row['self_draft']['bytes'])})"] if "self_draft" in row else [])
        )
        fits = {"ram": "in memory", "pinned": "pinned RAM -> GPU", "ssd": "streamed from SSD", "no": "no"}[row["fits"]]
        table.add_row(
            row["name"], f"{row['params_b']:g}B", _gb(row["bytes_16bit"]), _gb(row["bytes_4bit"]),
            "yes" if row["present"] else "no", fits, drafts,
        )
    Console(file=out, width=160).print(table)
