"""Peak RSS of a streamed run against --ram-budget: does the target stay within budget + a fixed overhead?

    .venv/bin/python benchmarks/rss_budget.py --budgets 1,770MB,1.5GB --quant 16bit
    .venv/bin/python benchmarks/rss_budget.py --budgets 770MB --drafts none,demo-0.5b,self:int8

Each (draft, budget) runs in a fresh process (`specchat run --offload ssd`, 16 new tokens,
greedy) and reads that process's own peak RSS (its ``ru_maxrss`` from ``wait4``).  The fixed
overhead is what does not depend on the budget: Python + torch, the resident embeddings/norm/LM
head in float32, the ring of read buffers and layer slots, the KV cache and activations; a
draft adds its own resident bytes (the JSON stats' ``draft.bytes``, pre-flighted) on top.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from specchat.app.config import parse_size


def run(budget: str, draft: str, quant: str, tokens: int) -> dict:
    command = [
        sys.executable, "-m", "specchat", "run", "--model", "demo", "--draft", draft, "--offload", "ssd",
        "--quant", quant, "--ram-budget", budget, "--max-new-tokens", str(tokens), "--json",
        "Write a haiku about the sea",
    ]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak, not the max over all children
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"specchat run --draft {draft} --ram-budget {budget} failed:\n{stderr}")
    plan = next(line for line in stderr.splitlines() if line.startswith("offload"))
    stats = json.loads(stdout)["stats"]
    return {
        "budget": budget, "budget_bytes": parse_size(budget), "draft": draft, "peak_rss_bytes": usage.ru_maxrss * 1024,
        "draft_bytes": (stats.get("draft") or {}).get("bytes", 0), "plan": plan,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budgets", default="1,770MB,1.5GB")
    parser.add_argument("--drafts", default="none", help="comma-separated --draft values")
    parser.add_argument("--quant", default="16bit")
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    rows = [run(b, d, args.quant, args.tokens) for d in args.drafts.split(",") for b in args.budgets.split(",")]
    for row in rows:
        over = row["peak_rss_bytes"] - row["budget_bytes"]
        print(
            f"draft {row['draft']:>10} ({row['draft_bytes'] / 1e9:.2f} GB) budget {row['budget']:>7}: "
            f"peak RSS {row['peak_rss_bytes'] / 1e9:.2f} GB = budget + {over / 1e9:.2f} GB | {row['plan']}"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
