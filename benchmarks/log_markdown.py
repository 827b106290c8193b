"""Markdown table of a `specchat bench --log` file (the prompts every configuration finished).

    .venv/bin/python benchmarks/log_markdown.py benchmarks/results/ssd_n20_t0.jsonl

Per-prompt spread is shown as the range of each configuration's per-prompt tokens/s ratio to
AR on the same prompt (the interleaving makes those pairs comparable).
"""

from __future__ import annotations

import sys
from pathlib import Path

from specchat.bench.sweep import physical_limit, ratios_to_ar
from specchat.bench.log import read_log


def main(path: str) -> None:
    log = read_log(Path(path))
    rows = log.rows()
    prompts = log.complete_prompts()
    ratios = ratios_to_ar(rows)
    bandwidth = log.stream_bytes_per_s
    print(f"{len(prompts)} prompts complete; stream {bandwidth / 1e9:.2f} GB/s" if bandwidth else f"{len(prompts)} prompts complete")
    print()
    print("| method | budget | temp | nodes/pass | tok/pass | tok/s | vs AR | per-prompt vs AR (min-max) | target s/pass | draft s/pass | MB read/pass | of limit |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        key = (row.method, row.budget, row.temperature)
        spread = _per_prompt_spread(log, prompts, key)
        limit = physical_limit(row, bandwidth)
        budget = "auto" if row.budget is None else ("-" if row.method == "ar" else str(row.budget))
        ratio = ratios.get(key)
        print(
            f"| {row.method} | {budget} | {row.temperature:g} | {_nodes(row)} | {row.tokens_per_pass:.2f} | {row.tokens_per_s:.2f} | "
            f"{f'{ratio:.2f}x' if ratio else '-'} | {spread} | {row.per_pass('target_s'):.2f} | "
            f"{row.per_pass('draft_s'):.2f} | {row.per_pass('decode_read_bytes') / 1e6:.0f} | "
            f"{f'{row.tokens_per_s / limit:.0%}' if limit else '-'} |"
        )


def _nodes(row) -> str:
    """Mean tree nodes verified per pass ("?" for runs logged before session 5, which did not record it)."""
    if row.method == "ar":
        return "-"
    return f"{row.tree_nodes_per_pass:.0f}" if row.tree_nodes_per_pass is not None else "?"


def _rate(stats) -> float:
    return stats.new_tokens / max(stats.wall_s - stats.prefill_s, 1e-9)


def _per_prompt_spread(log, prompts, key) -> str:
    ar_key = next((k for k in log.configurations if k[0] == "ar" and k[2] == key[2]), None)
    if ar_key is None:
        return "-"
    values = [_rate(log.runs[p][key]) / _rate(log.runs[p][ar_key]) for p in prompts]
    return f"{min(values):.2f}-{max(values):.2f}x"


if __name__ == "__main__":
    main(sys.argv[1])
