"""The chat session and REPL on tiny models: transcript, KV reuse, interrupts, save/load, context."""

import io
import json
import re
import stat

import pytest
import torch
from prompt_toolkit import PromptSession
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console
from typer.testing import CliRunner

from specchat.app.chat import ChatSession, Notice, load_session, save_session
from specchat.cli.app import app
from specchat.app.config import RunConfig
from specchat.engine.config import GenerationConfig
from specchat.engine.engine import Engine
from specchat.common.errors import InputError
from specchat.engine.events import DoneEvent
from specchat.model.lm import causal_visibility
from specchat.app.loader import load_pipeline
from specchat.cli.repl import Repl


@pytest.fixture
def pipeline(tiny_dirs):
    config = RunConfig(model=str(tiny_dirs["target"]), draft=str(tiny_dirs["draft"]), draft_quant="none")
    return load_pipeline(config, progress=lambda message: None)


def new_session(pipeline, **settings) -> ChatSession:
    pipeline.engine.reset()
    return ChatSession(pipeline, GenerationConfig(max_new_tokens=8, budget=4, **settings))


def say(session: ChatSession, text: str) -> DoneEvent:
    return [e for e in session.reply(text) if isinstance(e, DoneEvent)][-1]


def fresh_reply(pipeline, conversation, settings: GenerationConfig) -> str:
    """The greedy reply of a brand-new engine prefilled with the whole conversation."""
    engine = Engine(pipeline.engine.target, pipeline.engine.draft, pipeline.tokenizer, pipeline.engine.eos_token_ids)
    events = list(engine.generate(pipeline.encode_chat(conversation), settings))
    return events[-1].text


def test_repl_transcript_for_a_two_turn_chat(pipeline):
    session = new_session(pipeline)
    first = fresh_reply(pipeline, [{"role": "user", "content": "the blue sea"}], session.settings)
    history = [
        {"role": "user", "content": "the blue sea"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "a calm tide"},
    ]
    second = fresh_reply(pipeline, history, GenerationConfig(max_new_tokens=5, budget=8))
    out = io.StringIO()
    with create_pipe_input() as pipe:
        pipe.send_text("the blue sea\n/set budget 8\n/set max_tokens 5\n/set colour red\na calm tide\n/stats\n/exit\n")
        prompt = PromptSession(input=pipe, output=DummyOutput())
        Repl(session, Console(file=out, force_terminal=False, width=300), lambda: prompt.prompt(">>> ")).run()
    transcript = re.sub(r"\d+\.\d+ tok/s", "N tok/s", out.getvalue())
    transcript = re.sub(r"\d+\.\d+ tok/pass", "N tok/pass", transcript)
    transcript = re.sub(r"· \d+ passes", "· P passes", transcript)
    transcript = re.sub(r"in \d+ passes|tokens per pass: [\d ]+", "X", transcript)
    s1, s2 = session.totals, session.last_stats
    expected = (
        f"{first}\n8 tokens · N tok/s · N tok/pass · budget 4 · P passes\n"
        "budget = 8\n"
        "max_tokens = 5\n"
        "usage: /set {temperature|top_p|budget|method|max_tokens} VALUE\n"
        f"{second}\n5 tokens · N tok/s · N tok/pass · budget 8 · P passes\n"
        f"session: 2 replies, {s1.new_tokens} tokens, {s1.passes} target passes, N tok/pass, N tok/s\n"
        "settings: method specexec, budget 8, temperature 0, top_p 1, max_tokens 5\n"
        f"models: {pipeline.target_name} (float32, resident), draft {pipeline.draft_name} "
        f"({pipeline.draft_bits}-bit, {pipeline.draft_bytes / 1e9:.2f} GB)\n"
        f"last reply: 5 tokens X, prefill {s2.prefill_tokens} tokens, X\n"
    )
    assert transcript == expected


def test_second_turn_prefills_only_its_new_tokens_and_matches_a_fresh_session(pipeline):
    session = new_session(pipeline)
    say(session, "the blue sea")
    cached = list(pipeline.engine.tokens)
    second = say(session, "a calm tide")
    prompt = pipeline.encode_chat(session.conversation()[:-1])
    assert prompt[: len(cached)] == cached  # the template reproduces what the engine holds
    assert second.stats.prefill_tokens == len(prompt) - len(cached)
    assert second.stats.prefill_tokens < len(pipeline.encode_chat([{"role": "user", "content": "a calm tide"}])) + 4
    assert second.text == fresh_reply(pipeline, session.conversation()[:-1], session.settings)


class InterruptingModel:
    """Wraps a model; raises KeyboardInterrupt on a chosen forward call, like Ctrl-C would."""

    def __init__(self, inner):
        self.inner, self.calls, self.fire_at = inner, 0, None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.fire_at is not None and self.calls == self.fire_at:
            self.fire_at = None
            raise KeyboardInterrupt
        return self.inner.forward(*args, **kwargs)


def test_ctrl_c_mid_reply_a_hundred_times_keeps_caches_and_history_consistent(pipeline):
    wrapper = InterruptingModel(pipeline.engine.target)
    pipeline.engine.target = wrapper
    session = new_session(pipeline)
    repl = Repl(session, Console(file=io.StringIO(), force_terminal=False), lambda: "")
    words = "the sea wave blue moon fish sand wind salt deep".split()
    for round_ in range(100):
        wrapper.fire_at = wrapper.calls + 1 + round_ % 4  # somewhere in the prefill or a later pass
        repl._reply(words[round_ % 10])
        assert session.messages[-1]["interrupted"] is True
        repl._reply(words[(round_ + 3) % 10])
        assert "interrupted" not in session.messages[-1]
        engine = pipeline.engine
        assert engine.target_cache.length == len(engine.tokens) - 1
        assert engine.draft_cache.length <= len(engine.tokens) - 1
        if len(session.messages) > 12:
            session.reset()
    pipeline.engine.target = wrapper.inner
    history = session.conversation()
    reply = say(session, "deep calm")
    assert reply.text == fresh_reply(pipeline, history + [{"role": "user", "content": "deep calm"}], session.settings)


class InterruptingCache:
    """A cache whose chosen layer raises KeyboardInterrupt: Ctrl-C inside a forward, between layers."""

    def __init__(self, inner, layer):
        self.inner, self.layer = inner, layer

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx == self.layer:
            raise KeyboardInterrupt
        return self.inner.update(key_states, value_states, layer_idx, *args, **kwargs)


class InterruptingInsideModel(InterruptingModel):
    def forward(self, input_ids, positions, visible, cache, **kwargs):
        self.calls += 1
        if self.fire_at is not None and self.calls == self.fire_at:
            self.fire_at = None
            cache = InterruptingCache(cache, layer=1)
        return self.inner.forward(input_ids, positions, visible, cache, **kwargs)


@pytest.mark.parametrize("fire_offset", [1, 2, 3])  # the prefill, the first and a later pass
def test_ctrl_c_inside_a_forward_between_layers_leaves_no_stale_slots(pipeline, fire_offset):
    assert pipeline.engine.target.num_layers >= 2
    wrapper = InterruptingInsideModel(pipeline.engine.target)
    pipeline.engine.target = wrapper
    session = new_session(pipeline)
    say(session, "the blue sea")
    wrapper.fire_at = wrapper.calls + fire_offset
    repl = Repl(session, Console(file=io.StringIO(), force_terminal=False), lambda: "")
    repl._reply("a calm tide and the deep sand under it")
    assert session.messages[-1]["interrupted"] is True
    engine = pipeline.engine
    pipeline.engine.target = wrapper.inner
    cache = engine.target_cache
    n = cache.length
    assert n <= len(engine.tokens) - 1
    fresh = engine.target.new_cache()
    engine.target.forward(torch.tensor(engine.tokens[:n]), torch.arange(n), causal_visibility(0, n), fresh)
    for layer in range(engine.target.num_layers):  # every slot the cache calls valid is the true one
        assert torch.allclose(cache._keys[layer][:, :, :n], fresh._keys[layer][:, :, :n], atol=1e-5)
        assert torch.allclose(cache._values[layer][:, :, :n], fresh._values[layer][:, :, :n], atol=1e-5)
    history = session.conversation()
    reply = say(session, "deep calm")
    assert reply.text == fresh_reply(pipeline, history + [{"role": "user", "content": "deep calm"}], session.settings)


def test_save_then_load_gives_the_same_next_reply(pipeline, tmp_path):
    session = new_session(pipeline)
    say(session, "the blue sea")
    say(session, "a calm tide")
    path = tmp_path / "s" / "chat.json"
    save_session(session, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    expected = say(session, "deep wind").text

    restored = new_session(pipeline)
    load_session(restored, path)
    assert restored.messages == session.messages[:4]
    assert say(restored, "deep wind").text == expected


@pytest.mark.parametrize(
    "content", ["{not json", json.dumps({"format": 1, "messages": [{"role": "wizard", "content": "x"}]}), json.dumps([1, 2])]
)
def test_a_corrupt_session_file_is_refused_and_the_conversation_kept(pipeline, tmp_path, content):
    session = new_session(pipeline)
    say(session, "the sea")
    before = list(session.messages)
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    lines, leave = session.command(f"/load {bad}")
    assert lines[0].startswith("error: session file") and not leave
    assert session.messages == before
    with pytest.raises(InputError):
        load_session(session, tmp_path / "missing.json")


def test_old_turns_are_dropped_to_fit_the_context(pipeline):
    session = new_session(pipeline, max_depth=8)
    session.system = "salt"
    long = " ".join(["sea"] * 150)
    notices = []
    for _ in range(4):
        notices += [e.text for e in session.reply(long) if isinstance(e, Notice)]
    assert notices and "dropped" in notices[0]
    assert session.conversation()[0] == {"role": "system", "content": "salt"}
    assert len(pipeline.encode_chat(session.conversation())) < pipeline.engine.target.max_context


def test_a_message_longer_than_the_context_keeps_the_whole_conversation(pipeline, tmp_path):
    session = new_session(pipeline, max_depth=8)
    say(session, "the blue sea")
    say(session, "a calm tide")
    before = list(session.messages)
    huge = " ".join(["sea"] * (pipeline.engine.target.max_context + 10))
    with pytest.raises(InputError, match="longer than the model's context"):
        list(session.reply(huge))
    assert session.messages == before
    repl = Repl(session, Console(file=io.StringIO(), force_terminal=False), lambda: "")
    repl._reply(huge)  # the REPL shows the one line and goes on
    assert session.messages == before


def test_save_to_a_directory_or_unwritable_place_is_one_line_and_keeps_the_session(pipeline, tmp_path):
    session = new_session(pipeline)
    say(session, "the sea")
    before = list(session.messages)
    (tmp_path / "dir.json").mkdir()
    lines, leave = session.command(f"/save {tmp_path / 'dir.json'}")
    assert lines[0].startswith(f"error: cannot save the session to {tmp_path / 'dir.json'}: ") and not leave
    (tmp_path / "file").write_text("x")
    lines, _ = session.command(f"/save {tmp_path / 'file' / 'below.json'}")  # a parent that is a file
    assert lines[0].startswith("error: cannot save the session to") and session.messages == before


@pytest.mark.parametrize("budget_command, auto", [("/set budget 3", False), ("/set budget auto", True)])
def test_a_saved_session_keeps_a_fixed_or_auto_budget(pipeline, tmp_path, budget_command, auto):
    session = new_session(pipeline)
    session.command(budget_command)
    path = tmp_path / "s.json"
    save_session(session, path)
    restored = ChatSession(pipeline, GenerationConfig(max_new_tokens=8, budget=4 if auto else None))
    load_session(restored, path)
    assert restored.settings.auto_budget is auto
    assert auto or restored.settings.budget == 3


def test_a_session_saved_with_a_draft_resumes_without_one(pipeline, tmp_path, tiny_dirs):
    session = new_session(pipeline)
    say(session, "the sea")
    path = tmp_path / "s.json"
    save_session(session, path)
    no_draft = load_pipeline(RunConfig(model=str(tiny_dirs["target"]), draft="none"), progress=lambda message: None)
    restored = ChatSession(no_draft, GenerationConfig(method="ar", max_new_tokens=4))
    load_session(restored, path)
    assert restored.settings.method == "ar" and restored.messages == session.messages
    assert say(restored, "a calm tide").stats.new_tokens >= 1


def test_an_engine_refusal_is_one_line_and_no_half_turn(pipeline, monkeypatch):
    session = new_session(pipeline)
    say(session, "the sea")
    before = list(session.messages)
    monkeypatch.setattr(session.pipeline.engine, "draft", None)  # the engine now refuses tree methods
    lines = io.StringIO()
    Repl(session, Console(file=lines, force_terminal=False), lambda: "")._reply("a calm tide")
    assert "error: cannot reply: method specexec needs a draft model" in lines.getvalue()
    assert session.messages == before


def test_unknown_command_and_bad_values_keep_the_session_going(pipeline):
    session = new_session(pipeline)
    assert session.command("/frobnicate")[0] == ["unknown command /frobnicate; /help lists them"]
    assert session.command("/set temperature -1")[0][0].startswith("bad value for temperature")
    assert session.command("/set method beam")[0][0].startswith("bad value for method")
    assert session.command("/set top_p 2")[0][0].startswith("bad value for top_p")
    assert session.command("/set budget 0")[0][0].startswith("bad value for budget")
    assert session.command("/set temperature inf")[0][0].startswith("bad value for temperature")
    assert session.command("/set temperature nan")[0][0].startswith("bad value for temperature")
    assert session.command("/set temperature 0.7") == (["temperature = 0.7"], False)
    assert session.command("/exit") == ([], True)


def test_multi_line_blocks(pipeline):
    session = new_session(pipeline)
    lines = iter(['"""', "the blue", "sea", '"""', '"""one line"""', "/exit"])
    seen = []
    session.reply = lambda text: (seen.append(text), iter(()))[1]
    Repl(session, Console(file=io.StringIO(), force_terminal=False), lambda: next(lines)).run()
    assert seen == ["the blue\nsea", "one line"]


def test_chat_command_reads_one_message_per_line_from_a_pipe(tiny_dirs):
    result = CliRunner().invoke(
        app,
        ["chat", "--model", str(tiny_dirs["target"]), "--draft", str(tiny_dirs["draft"]), "--max-new-tokens", "4"],
        input="the sea\n/stats\n",
    )
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.match(r"4 tokens · [\d.]+ tok/s", lines[1])
    assert lines[2].startswith("session: 1 replies, 4 tokens")


def test_chat_resume_refuses_a_corrupt_file_with_one_line(tiny_dirs, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    result = CliRunner().invoke(app, ["chat", "--model", str(tiny_dirs["target"]), "--draft", "none", "--method", "ar", "--resume", str(bad)], input="")
    assert result.exit_code != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: session file")


def test_chat_resume_of_a_missing_file_fails_before_loading_the_model(tmp_path):
    result = CliRunner().invoke(app, ["chat", "--model", str(tmp_path / "no-model"), "--resume", str(tmp_path / "gone.json")], input="")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"error: session file {tmp_path / 'gone.json'} does not exist; give the path that /save printed"]
