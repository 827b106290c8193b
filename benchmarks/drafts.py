"""The self draft against the sibling draft in one run: one loaded target, one engine per draft,
every configuration interleaved prompt by prompt (so a slow minute hurts both drafts alike).

    .venv/bin/python benchmarks/drafts.py --n 6 --offload ssd --ram-budget 770MB --budgets 16,32 \
        --log benchmarks/results/drafts_ssd_n6_t0.jsonl

Runs AR once per prompt, then SpecExec with each draft at each budget (greedy unless
``--temperature``), each from empty caches; `--draft-batch auto` on each engine's own measured
calibration.  ``--lookahead auto`` grows the next tree while the target verifies where the loader
would (the self draft beside a streamed target); ``both`` runs each draft with and without it
(rows marked ``+la``).  ``--coupling both`` runs sampled SpecExec by the shared noise and, in rows
marked ``uncoupled``, by draws from the generator.  ``--sibling-budgets`` gives the sibling budgets
of its own.  ``--target-head`` runs each self draft that keeps a copy of the head
(model/drafthead.py) once more over the target's own head (rows marked ``target-head``).  ``--first``
starts at a later prompt (a run continuing another); ``--summarise`` prints the table of ``--log``
files instead.  Prints one table; every run is appended to ``--log`` as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import fields
from pathlib import Path

from specchat import RunConfig
from specchat.app.config import parse_size
from specchat.app.loader import load_pipeline
from specchat.bench.sweep import BenchConfig, Row, load_prompts, run_bench
from specchat.engine.autobudget.costmodel import PRIOR_BETA
from specchat.engine.autobudget.costs import PassCosts
from specchat.engine.engine import Engine
from specchat.engine.events import GenerationStats
from specchat.sources.facts import read_facts
from specchat.model.loading import load_int8
from specchat.model.selfdraft import build_self_draft, self_draft_dir, self_draft_kind
from specchat.common.paths import cache_dir
from specchat.sources.registry import load_registry
from specchat.sources.resolve import materialize, parse_model_spec
from specchat.speculation.agreement import SELF_DRAFT_RATE
from specchat.speculation.lookahead import Lookahead
from specchat.speculation.speculator import SPECULATORS, SpecExec


class Pipeline:
    """What run_bench needs of a pipeline: an engine and the chat encoding."""

    def __init__(self, engine: Engine, encode_chat) -> None:
        self.engine, self.encode_chat = engine, encode_chat


def engines(args) -> tuple[dict[str, Pipeline], object]:
    """One pipeline per draft and lookahead setting over the same loaded target (the self draft's,
    which loads first); each draft calibrated once, on itself, each engine with costs of its own."""
    config = RunConfig(model="demo", draft=args.self_draft, offload=args.offload, budget=16, quant=args.quant,
                       ram_budget=parse_size(args.ram_budget) if args.ram_budget else None)
    loaded = load_pipeline(config, print, calibrate=False)
    target, tokenizer, eos = loaded.engine.target, loaded.engine.tokenizer, loaded.engine.eos_token_ids
    if args.disk_gbps:
        throttle(target.layer_source, args.disk_gbps * 1e9)
    drafts = [(args.self_draft, loaded.engine.draft)]
    if args.sibling.startswith("self:"):  # a second self draft (another bit width) over the same target
        facts, kind = read_facts(loaded.target.path), self_draft_kind(args.sibling)
        weights = loaded.offload.quant
        where = self_draft_dir(cache_dir() / "stores", facts, kind, weights)
        drafts.append((args.sibling, build_self_draft(target, facts, kind, print, cache_dir=where, weights=weights)))
    elif args.sibling:
        drafts.append((args.sibling, load_int8(materialize(parse_model_spec(args.sibling, load_registry()), print)).lm))
    if args.target_head:  # each self draft again over the target's own head, where it computes with a copy
        drafts += [(f"{name} target-head", target.with_layers(draft.layer_source, draft.layer_dtype, draft.kv_source is not None))
                   for name, draft in drafts if name.startswith("self:") and draft.lm_head is not target.lm_head]
    out = {}
    for name, draft in drafts:
        started = time.perf_counter()
        calibration = PassCosts().ensure(target, draft, config.max_depth, 8)
        print(f"{name}: calibrated in {time.perf_counter() - started:.0f} s", flush=True)
        is_self = name.startswith("self:")
        settings = args.lookahead or ((is_self and loaded.engine.lookahead is not None),)
        for lookahead, coupled in itertools.product(settings, args.coupling):
            costs = PassCosts(calibration, largest_budget=loaded.engine.costs.largest_budget,
                              prior_beta=loaded.engine.costs.prior_beta if is_self else PRIOR_BETA)
            engine = Engine(target, draft, tokenizer, eos, costs=costs, lookahead=Lookahead() if lookahead else None,
                            agreement_prior=SELF_DRAFT_RATE if is_self else None,
                            speculators={**SPECULATORS, "specexec": SpecExec(coupled=coupled)})
            label = name + (" +la" if lookahead and len(args.lookahead) > 1 else "") + ("" if coupled else " uncoupled")
            out[label] = Pipeline(engine, loaded.encode_chat)
    return out, loaded


def throttle(source, bytes_per_s: float) -> None:
    """Make the streamed target's reads take at least their bytes / ``bytes_per_s`` (a slower disk
    than this machine's: a SATA SSD reads ~0.5 GB/s), by sleeping after each layer file's read."""
    read_into = source.reader.read_into

    def slow(index, buffer, **kwargs):
        started = time.perf_counter()
        read_into(index, buffer, **kwargs)
        time.sleep(max(0.0, source.store.layer_bytes / bytes_per_s - (time.perf_counter() - started)))

    source.reader.read_into = slow


def budget_label(budget: int | None) -> str:
    """0 is AR's (no tree), None is --budget auto."""
    return "-" if budget == 0 else "auto" if budget is None else str(budget)


def parse_budgets(text: str) -> tuple[int | None, ...]:
    """'16,auto' -> (16, None)."""
    return tuple(None if b == "auto" else int(b) for b in text.split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--first", type=int, default=0, help="index of the first MT-Bench prompt (a run continuing another)")
    parser.add_argument("--summarise", type=Path, nargs="+", help="print the table of these --log files' runs instead of running")
    parser.add_argument("--offload", default="ssd")
    parser.add_argument("--ram-budget", default="770MB")
    parser.add_argument("--quant", default="16bit", help="the target's weights: 16bit or 4bit (NF4)")
    parser.add_argument("--budgets", default="16,32", help="comma-separated; auto for --budget auto")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--self-draft", default="self:int8")
    parser.add_argument("--sibling", default="demo-0.5b",
                        help="'' for none (the self draft alone); self:KIND for a second self draft")
    parser.add_argument("--lookahead", default="auto", choices=("auto", "on", "off", "both"),
                        help="grow the next tree while the target verifies (auto: as the loader decides; "
                             "both: each draft each way, interleaved)")
    parser.add_argument("--coupling", default="on", choices=("on", "off", "both"),
                        help="sampled SpecExec by shared noise (speculation/coupling.py), drawing from a generator, or both")
    parser.add_argument("--disk-gbps", type=float, default=0.0, help="emulate a disk reading at most this many GB/s (0: as is)")
    parser.add_argument("--log", type=Path)
    parser.add_argument("--sibling-budgets", default="", help="the sibling's budgets (default: --budgets)")
    parser.add_argument("--target-head", action="store_true",
                        help="also run each self draft that keeps a copy of the head over the target's own head")
    args = parser.parse_args()
    if args.summarise:
        print_table(rows_from_logs(args.summarise), args.sibling)
        return
    args.lookahead = {"auto": (), "on": (True,), "off": (False,), "both": (False, True)}[args.lookahead]
    args.coupling = {"on": (True,), "off": (False,), "both": (True, False)}[args.coupling]
    pipelines, loaded = engines(args)
    prompts = load_prompts(None, args.first + args.n)
    budgets = parse_budgets(args.budgets)
    sibling_budgets = parse_budgets(args.sibling_budgets or args.budgets)
    base = loaded.config.generation()
    rows: dict[tuple[str, str, int], Row] = {}
    log = args.log.open("a") if args.log else None
    for index in range(args.first, len(prompts)):
        skip = frozenset(i for i in range(len(prompts)) if i != index)
        for name, pipeline in pipelines.items():
            methods = ("ar", "specexec") if name == next(iter(pipelines)) else ("specexec",)
            own = budgets if name.startswith(args.self_draft) else sibling_budgets
            bench = BenchConfig(prompts, methods, own, (args.temperature,), 0.9, args.max_new_tokens, 0)
            for row in run_bench(pipeline, bench, base, lambda record: None, skip):
                key = ("-" if row.method == "ar" else name, row.method, row.budget)
                rows.setdefault(key, Row(row.method, row.budget, row.temperature)).runs += row.runs
                if log:
                    stats = row.runs[-1]
                    log.write(json.dumps({"prompt": index, "draft": key[0], "method": row.method, "budget": row.budget,
                                          "stats": stats.to_dict()}) + "\n")
                    log.flush()
        print(f"prompt {index + 1}/{len(prompts)} done", flush=True)
    print_table(rows, args.sibling)


def rows_from_logs(paths: list[Path]) -> dict[tuple[str, str, int | None], Row]:
    """The rows of one or more ``--log`` files (runs continuing each other with ``--first``)."""
    names = {f.name for f in fields(GenerationStats)}
    rows: dict[tuple[str, str, int | None], Row] = {}
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            stats = GenerationStats(**{k: v for k, v in record["stats"].items() if k in names})
            key = (record["draft"], record["method"], record["budget"])
            rows.setdefault(key, Row(record["method"], record["budget"], 0.0)).runs.append(stats)
    return rows


def print_table(rows: dict[tuple[str, str, int | None], Row], sibling: str) -> None:
    ar = rows[("-", "ar", 0)].tokens_per_s
    sibling_best = max((r.tokens_per_s for (draft, _, _), r in rows.items() if sibling and draft.startswith(sibling)), default=ar)
    prompts = len(rows[("-", "ar", 0)].runs)
    print(f"{prompts} prompts")
    print(f"{'draft':16} {'budget':>6} {'tok/pass':>8} {'tok/s':>6} {'vs AR':>6} {'vs best sibling':>15} {'target s/pass':>13} {'draft s/pass':>12}")
    for (draft, method, budget), row in rows.items():
        print(f"{draft:16} {budget_label(budget):>6} {row.tokens_per_pass:8.2f} {row.tokens_per_s:6.2f} {row.tokens_per_s / ar:5.2f}x "
              f"{row.tokens_per_s / sibling_best:14.2f}x {row.per_pass('target_s'):13.2f} {row.per_pass('draft_s'):12.2f}")


if __name__ == "__main__":
    main()
