"""Soak: chat turns on the demo pair for a while, with Ctrl-C, /reset, /save and /load mixed in,
recording RSS, open file descriptors and tokens/s per turn.  Not a test: run it by hand.

    .venv/bin/python benchmarks/soak.py --minutes 60 --log benchmarks/results/soak.jsonl

Every turn is a real :class:`ChatSession` reply (the same object `specchat chat` drives).  Every
5th turn is interrupted by a real SIGINT after ``--interrupt-after`` seconds, caught as the REPL
catches it; every 7th saves the session and loads it back; every 11th resets the conversation.
The summary compares RSS and descriptors after warm-up (the first ``--warmup`` turns; one pass
over the 80 prompts reaches the longest conversations) and counts failures (any exception other
than the interrupts); at the end it trims the C heap and reads RSS again.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import tempfile
import threading
import time
import traceback
from pathlib import Path

import psutil

from specchat import ChatSession, DoneEvent, RunConfig, load
from specchat.bench.sweep import load_prompts


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def interrupted_turn(session: ChatSession, text: str, after_s: float) -> int:
    """A reply stopped by SIGINT after ``after_s`` seconds; returns the tokens it got out."""
    timer = threading.Timer(after_s, os.kill, (os.getpid(), signal.SIGINT))
    events, tokens = session.reply(text), 0
    timer.start()
    try:
        for event in events:
            tokens += len(getattr(event, "token_ids", ()))
    except KeyboardInterrupt:
        events.close()  # what the REPL does: the partial reply stays in the history
    finally:
        timer.cancel()
    return tokens


def turn(session: ChatSession, index: int, text: str, args, scratch: Path) -> dict:
    record = {"turn": index, "kind": "reply"}
    if index % 11 == 10:
        session.command("/reset")
        record["kind"] = "reset+reply"
    if index % 7 == 6:
        path = scratch / "soak.json"
        [saved], _ = session.command(f"/save {path}")
        [loaded, *_], _ = session.command(f"/load {path}")
        assert saved.startswith("saved") and loaded.startswith("loaded"), (saved, loaded)
        record["kind"] = "save+load+reply"
    started = time.perf_counter()
    if index % 5 == 4:
        record["kind"] = "interrupted"
        record["tokens"] = interrupted_turn(session, text, args.interrupt_after)
    else:
        done = [e for e in session.reply(text) if isinstance(e, DoneEvent)][-1]
        record["tokens"] = done.stats.new_tokens
        record["tokens_per_pass"] = round(done.stats.tokens_per_pass, 2)
        record["prompt_tokens"] = done.stats.prompt_tokens  # the conversation's length: per-pass memory grows with it
    record["wall_s"] = round(time.perf_counter() - started, 2)
    record["tokens_per_s"] = round(record["tokens"] / max(record["wall_s"], 1e-9), 2)
    return record


def summary(records: list[dict], warmup: int) -> dict:
    steady = [r for r in records if r["turn"] >= warmup] or records
    rss = [r["rss_mb"] for r in steady]
    fds = [r["fds"] for r in steady]
    speeds = [r["tokens_per_s"] for r in steady if r["kind"] != "interrupted"]
    return {
        "turns": len(records),
        "failures": sum(1 for r in records if "error" in r),
        "interrupted": sum(1 for r in records if r["kind"] == "interrupted"),
        "rss_mb_after_warmup": {"first": rss[0], "min": min(rss), "max": max(rss), "last": rss[-1]},
        "rss_growth_pct": round(100 * (max(rss) - rss[0]) / rss[0], 2),
        "fds_after_warmup": {"min": min(fds), "max": max(fds)},
        "tokens_per_s_median": statistics.median(speeds) if speeds else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--interrupt-after", type=float, default=1.5)
    parser.add_argument("--warmup", type=int, default=80)
    parser.add_argument("--log", type=Path, default=Path("benchmarks/results/soak.jsonl"))
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    pipeline = load(RunConfig(model="demo", max_new_tokens=args.max_new_tokens), lambda message: None)
    session = ChatSession(pipeline, pipeline.config.generation())
    prompts = [p for p in load_prompts(None, 80)]
    process, records = psutil.Process(), []
    deadline = time.monotonic() + 60 * args.minutes
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch, args.log.open("w") as log:
        index = 0
        while time.monotonic() < deadline:
            try:
                record = turn(session, index, prompts[index % len(prompts)], args, Path(scratch))
            except Exception as exc:  # a failure is what the soak is looking for: record it, go on
                record = {"turn": index, "kind": "failed", "error": repr(exc), "trace": traceback.format_exc(), "tokens_per_s": 0}
            caches = [c for c in (pipeline.engine.target_cache, pipeline.engine.draft_cache) if c is not None]
            record |= {"rss_mb": round(process.memory_info().rss / 2**20, 1), "fds": open_descriptors(),
                       "kv_mb": round(sum(c.nbytes() for c in caches) / 2**20, 1),
                       "elapsed_s": round(60 * args.minutes - (deadline - time.monotonic()), 1)}
            records.append(record)
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(json.dumps({k: v for k, v in record.items() if k != "trace"}), flush=True)
            index += 1
    result = summary(records, args.warmup)
    result["environment"] = {name: os.environ.get(name, "unset") for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "MALLOC_ARENA_MAX")}
    result["rss_mb_after_malloc_trim"] = trimmed_rss_mb(process)  # what of the growth is the allocator's
    print(json.dumps(result, indent=1))


def trimmed_rss_mb(process: psutil.Process) -> float | None:
    """RSS after glibc hands its free heap pages back: a drop is fragmentation, what stays is held."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        return None
    return round(process.memory_info().rss / 2**20, 1)


if __name__ == "__main__":
    main()
