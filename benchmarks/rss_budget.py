"""Peak RSS of a streamed run against --ram-budget: does the target stay within budget + a fixed overhead?

    .venv/bin/python benchmarks/rss_budget.py --budgets 1,770MB,1.5GB --quant 16bit

Each budget runs in a fresh process (`specchat run --draft none --offload ssd`, 16 new tokens,
greedy) and reads that process's peak RSS (VmHWM).  The fixed overhead is what does not
depend on the budget: Python + torch, the resident embeddings/norm/LM head in float32, the
ring of read buffers and layer slots, the KV cache and activations.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

from specchat.app.config import parse_size


def run(budget: str, quant: str, tokens: int) -> dict:
    command = [
        sys.executable, "-m", "specchat", "run", "--model", "demo", "--draft", "none", "--offload", "ssd",
        "--quant", quant, "--ram-budget", budget, "--max-new-tokens", str(tokens), "--json",
        "Write a haiku about the sea",
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kb <= before:
        raise SystemExit("run one budget per invocation order from small to large: ru_maxrss is a maximum over children")
    plan = next(line for line in result.stderr.splitlines() if line.startswith("offload"))
    return {"budget": budget, "budget_bytes": parse_size(budget), "peak_rss_bytes": peak_kb * 1024, "plan": plan}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budgets", default="1,770MB,1.5GB")
    parser.add_argument("--quant", default="16bit")
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    rows = [run(b, args.quant, args.tokens) for b in args.budgets.split(",")]  # ascending, see run()
    for row in rows:
        over = row["peak_rss_bytes"] - row["budget_bytes"]
        print(f"budget {row['budget']:>7}: peak RSS {row['peak_rss_bytes'] / 1e9:.2f} GB = budget + {over / 1e9:.2f} GB | {row['plan']}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
