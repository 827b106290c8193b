"""Rendering for the terminal: tables and progress (rich).  Nothing here computes results."""

from __future__ import annotations

import json
from typing import TextIO

from rich.console import Console
from rich.table import Table

from .bench import Row, ratios_to_ar


def bench_table(rows: list[Row], out: TextIO) -> None:
    ratios = ratios_to_ar(rows)
    table = Table(title="specchat bench", title_justify="left")
    for header in ("method", "budget", "temp", "prompts", "tok/pass", "tok/s", "vs AR", "target s/pass", "draft s/pass", "MB read/pass"):
        table.add_column(header, justify="left" if header == "method" else "right")
    for row in rows:
        ratio = ratios.get((row.method, row.budget, row.temperature))
        table.add_row(
            row.method,
            str(row.budget) if row.method != "ar" else "-",
            f"{row.temperature:g}",
            str(len(row.runs)),
            f"{row.tokens_per_pass:.2f}",
            f"{row.tokens_per_s:.2f}",
            f"{ratio:.2f}x" if ratio is not None else "-",
            f"{row.per_pass('target_s'):.2f}",
            f"{row.per_pass('draft_s'):.2f}",
            f"{row.per_pass('decode_read_bytes') / 1e6:.0f}",
        )
    Console(file=out, width=140).print(table)


def bench_json(rows: list[Row], setup: dict, out: TextIO) -> None:
    ratios = ratios_to_ar(rows)
    payload = {
        "setup": setup,
        "rows": [
            row.to_dict() | {"ratio_to_ar": ratios.get((row.method, row.budget, row.temperature))} for row in rows
        ],
    }
    out.write(json.dumps(payload, indent=1) + "\n")
