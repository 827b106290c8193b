"""`specchat run`: one prompt in (argument or stdin), one reply out (streamed text or JSON)."""

from __future__ import annotations

import json
import sys
from typing import TextIO

from specchat import DoneEvent, EngineError, InputError, PrefillEvent, RunConfig, TextEvent, load
from specchat.cli.views import prefill_line


def read_prompt(prompt: str | None, stdin: TextIO) -> str:
    """The prompt argument, or all of stdin when it is omitted or '-'."""
    if prompt is not None and prompt != "-":
        text = prompt
    else:
        if prompt is None and stdin.isatty():
            raise InputError("no prompt given", 'pass one as an argument or pipe it in: echo "hi" | specchat run')
        raw = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(
                f"stdin is not UTF-8 text (byte {exc.start} is 0x{raw[exc.start]:02x})", "convert the input to UTF-8"
            ) from exc
    if not text.strip():
        raise InputError("the prompt is empty", "type a question, or pipe a non-empty file")
    return text


def stats_line(stats) -> str:
    method = stats.method if stats.method == "ar" else f"{stats.method} K={stats.budget}"
    return (
        f"{stats.new_tokens} tokens, {stats.tokens_per_s:.2f} tok/s, {stats.tokens_per_pass:.2f} tok/pass "
        f"({stats.target_passes} passes, {method}), prefill {stats.prefill_tokens} tokens in {stats.prefill_s:.1f}s"
    )


def run_oneshot(
    config: RunConfig, prompt: str, as_json: bool, out: TextIO, err: TextIO, progress
) -> None:
    pipeline = load(config, progress)
    progress(pipeline.draft_reason)
    messages = [{"role": "system", "content": config.system}] if config.system else []
    messages.append({"role": "user", "content": prompt.strip()})
    prompt_ids = pipeline.encode_chat(messages)
    context = pipeline.engine.target.max_context
    if len(prompt_ids) + config.max_depth + 1 >= context:
        raise InputError(
            f"the prompt is {len(prompt_ids)} tokens long but {pipeline.target_name} holds {context}",
            "shorten the prompt",
        )
    done, said = None, []
    try:
        for event in pipeline.generate(prompt_ids, config.generation()):
            if isinstance(event, PrefillEvent):
                progress(prefill_line(event))
            elif isinstance(event, TextEvent):
                said.append(event)
                if not as_json:
                    out.write(event.text)
                    out.flush()
            elif isinstance(event, DoneEvent):
                done = event
    except EngineError as exc:
        raise InputError(str(exc), "see `specchat run --help`") from exc
    except KeyboardInterrupt:
        if as_json:  # what was said so far, as the same object
            tokens = [t for event in said for t in event.token_ids]
            stats = {"new_tokens": len(tokens), "finish_reason": "interrupted", "draft": pipeline.draft_summary}
            out.write(json.dumps({"text": "".join(e.text for e in said), "tokens": tokens, "stats": stats}) + "\n")
        else:
            out.write("\n")
        out.flush()
        raise
    if as_json:
        stats = _json_stats(done.stats) | {"draft": pipeline.draft_summary}
        payload = {"text": done.text, "tokens": list(done.token_ids), "stats": stats}
        out.write(json.dumps(payload) + "\n")
    else:
        out.write("\n")
    out.flush()
    if err.isatty():
        print(stats_line(done.stats), file=err)


def _json_stats(stats) -> dict:
    keys = (
        "method", "budget", "new_tokens", "target_passes", "tokens_per_pass", "tokens_per_s",
        "wall_s", "prefill_s", "draft_s", "target_s", "disk_read_bytes", "finish_reason",
    )
    values = stats.to_dict()
    return {key: values[key] for key in keys}


def stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
