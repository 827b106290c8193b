"""`specchat serve` on tiny models: the official openai client against a real uvicorn server,
raw HTTP for what a client library would not send, and the command line around it."""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import openai
import pytest
from typer.testing import CliRunner

from specchat.app.config import RunConfig
from specchat.app.loader import load_pipeline
from specchat.cli.app import app
from specchat.engine.config import GenerationConfig
from specchat.engine.engine import Engine
from specchat.server.config import ServeConfig
from specchat.server.http import create_app
from specchat.server.listen import bind_socket, server_for
from specchat.server.service import ChatService

SETTINGS = GenerationConfig(budget=4, max_new_tokens=8)
HELLO = [{"role": "system", "content": "the sea"}, {"role": "user", "content": "a blue wave"}]


@pytest.fixture
def pipeline(tiny_dirs):
    config = RunConfig(model=str(tiny_dirs["target"]), draft=str(tiny_dirs["draft"]), draft_quant="none")
    return load_pipeline(config, progress=lambda message: None)


def service_for(pipeline, engine=None, queue_size: int = 8, settings: GenerationConfig = SETTINGS) -> ChatService:
    return ChatService(engine or pipeline.engine, pipeline.encode_chat, pipeline.target_name, settings, queue_size)


@contextmanager
def running(service: ChatService, settings: ServeConfig = ServeConfig(port=0)):
    """The app on a real uvicorn server in a thread; yields its (host, port)."""
    sock = bind_socket("127.0.0.1", 0)
    server = server_for(create_app(service, settings), service)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield sock.getsockname()[:2]
    finally:
        server.should_exit = True
        thread.join(10)


def client(address, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{address[0]}:{address[1]}/v1", api_key=key, max_retries=0, timeout=30)


def raw(address, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, str]:
    connection = http.client.HTTPConnection(*address, timeout=30)
    connection.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    return response.status, text


def fresh_reply(pipeline, messages, config: GenerationConfig = SETTINGS):
    """Plain greedy decoding of the target on a new engine: what every greedy reply must equal."""
    engine = Engine(pipeline.engine.target, None, pipeline.tokenizer, pipeline.engine.eos_token_ids)
    return list(engine.generate(pipeline.encode_chat(messages), GenerationConfig(method="ar", max_new_tokens=config.max_new_tokens)))[-1]


def test_the_openai_client_gets_the_targets_greedy_reply_with_usage_and_specchats_stats(pipeline):
    expected = fresh_reply(pipeline, HELLO)
    with running(service_for(pipeline)) as address:
        completion = client(address).chat.completions.create(model="any-name", messages=HELLO, temperature=0)
    choice = completion.choices[0]
    assert choice.message.content == expected.text and choice.message.role == "assistant"
    assert choice.finish_reason == {"eos": "stop", "length": "length"}[expected.stats.finish_reason]
    assert completion.model == pipeline.target_name and completion.object == "chat.completion"
    prompt = len(pipeline.encode_chat(HELLO))
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (prompt, expected.stats.new_tokens)
    assert completion.usage.total_tokens == prompt + expected.stats.new_tokens
    stats = completion.specchat
    assert stats["method"] == "specexec" and stats["budget"] == 4 and stats["target_passes"] >= 1
    assert stats["tokens_per_pass"] == pytest.approx(expected.stats.new_tokens / stats["target_passes"], abs=1e-3)


def test_a_stream_carries_the_same_text_in_openais_chunks_and_ends_with_done(pipeline):
    expected = fresh_reply(pipeline, HELLO)
    with running(service_for(pipeline)) as address:
        chunks = list(client(address).chat.completions.create(
            model="m", messages=HELLO, temperature=0, stream=True, stream_options={"include_usage": True}
        ))
        body = json.dumps({"messages": HELLO, "temperature": 0, "stream": True}).encode()
        status, text = raw(address, "POST", "/v1/chat/completions", body)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1 and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == expected.stats.new_tokens
    assert status == 200 and text.rstrip().endswith("data: [DONE]")
    assert all(json.loads(line[6:])["object"] == "chat.completion.chunk" for line in text.splitlines()
               if line.startswith("data: {"))


def test_a_conversation_that_extends_the_last_one_prefills_only_its_new_tokens(pipeline):
    with running(service_for(pipeline)) as address:
        api = client(address)
        first = api.chat.completions.create(model="m", messages=HELLO, temperature=0)
        follow_up = [*HELLO, {"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "the moon"}]
        second = api.chat.completions.create(model="m", messages=follow_up, temperature=0)
    assert second.choices[0].message.content == fresh_reply(pipeline, follow_up).text
    assert second.specchat["prefill_tokens"] < second.usage.prompt_tokens - len(pipeline.encode_chat(HELLO)) + 2


def test_models_and_health(pipeline):
    with running(service_for(pipeline)) as address:
        [model] = client(address).models.list().data
        status, text = raw(address, "GET", "/health")
    assert model.id == pipeline.target_name and model.owned_by == "specchat"
    assert status == 200 and json.loads(text) == {"status": "ok", "model": pipeline.target_name, "busy": False, "waiting": 0}


@pytest.mark.parametrize("header, status", [
    (None, 401), ("Bearer wrong", 401), ("secret", 401), ("Bearer secret", 200),
])
def test_with_an_api_key_only_requests_that_carry_it_are_answered(pipeline, header, status):
    with running(service_for(pipeline), ServeConfig(port=0, api_key="secret")) as address:
        got, text = raw(address, "GET", "/v1/models", headers={"Authorization": header} if header else {})
        health, _ = raw(address, "GET", "/health")
    assert (got, health) == (status, 200)
    if status == 401:
        assert json.loads(text)["error"]["code"] == "invalid_api_key"


LONG = " ".join(["wave"] * 600)
BAD_REQUESTS = [
    (b"{not json", 400, "the request body is not valid JSON"),
    (b"[1, 2]", 400, "the request body must be a JSON object"),
    ({}, 400, "invalid messages: field required"),
    ({"messages": []}, 400, "invalid messages: list should have at least 1 item"),
    ({"messages": "hi"}, 400, "invalid messages: input should be a valid list"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "invalid messages[0].role"),
    ({"messages": [{"role": "user"}]}, 400, "invalid messages[0].content: field required"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "invalid messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
     "messages[0].content[0] has type 'image_url': specchat's models read text only"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400, "invalid messages[0].content[0].text: field required"),
    ({"messages": HELLO, "temperature": "hot"}, 400, "invalid temperature: input should be a valid number"),
    ({"messages": HELLO, "temperature": 3}, 400, "invalid temperature: input should be less than or equal to 2"),
    ({"messages": HELLO, "top_p": 0}, 400, "invalid top_p"),
    ({"messages": HELLO, "max_tokens": 1.5}, 400, "invalid max_tokens: input should be a valid integer"),
    ({"messages": HELLO, "max_tokens": 0}, 400, "invalid max_tokens"),
    ({"messages": HELLO, "stream": "yes"}, 400, "invalid stream: input should be a valid boolean"),
    ({"messages": HELLO, "seed": -1}, 400, "invalid seed"),
    ({"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop takes up to 4 non-empty strings"),
    ({"messages": HELLO, "n": 2}, 400, "n is not supported: specchat returns one choice"),
    ({"messages": HELLO, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools is not supported"),
    ({"messages": HELLO, "logprobs": True}, 400, "logprobs is not supported"),
    ({"messages": HELLO, "presence_penalty": 0.5}, 400, "presence_penalty is not supported"),
    ({"messages": HELLO, "response_format": {"type": "json_object"}}, 400, "response_format is not supported"),
    ({"messages": [{"role": "user", "content": LONG}]}, 400, "cannot reply: the prompt has"),
    ({"messages": [{"role": "user", "content": LONG}], "stream": True}, 400, "cannot reply: the prompt has"),
]


def test_bad_requests_get_one_sentence_in_openais_error_shape_and_the_server_goes_on(pipeline):
    expected = fresh_reply(pipeline, HELLO)
    with running(service_for(pipeline)) as address:
        for body, status, message in BAD_REQUESTS:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            got, text = raw(address, "POST", "/v1/chat/completions", data)
            error = json.loads(text)["error"]
            assert (got, error["type"]) == (status, "invalid_request_error"), (body, text)
            assert error["message"].startswith(message) and "\n" not in error["message"], (body, error)
        ignored = {"user": "me", "metadata": {"a": "b"}, "n": 1, "presence_penalty": 0, "tool_choice": "none"}
        completion = client(address).chat.completions.create(model="m", messages=HELLO, temperature=0, extra_body=ignored)
    assert completion.choices[0].message.content == expected.text


@pytest.mark.parametrize("method, path, status, message", [
    ("GET", "/v1/chat/completions", 405, "GET is not allowed on /v1/chat/completions"),
    ("POST", "/v1/completions", 404, "no such endpoint: /v1/completions"),
])
def test_unknown_endpoints_and_methods_are_openai_errors(pipeline, method, path, status, message):
    with running(service_for(pipeline)) as address:
        got, text = raw(address, method, path, b"{}")
    assert (got, json.loads(text)["error"]["message"]) == (status, message)


def test_an_oversized_body_is_refused_before_it_is_parsed(pipeline):
    with running(service_for(pipeline), ServeConfig(port=0, max_body_bytes=1000)) as address:
        got, text = raw(address, "POST", "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "a" * 2000}]}).encode())
    assert got == 413 and json.loads(text)["error"]["message"] == "the request body is larger than the server's limit of 1000 bytes"


class GatedEngine:
    """The engine, with each reply held before its first pass until ``gate`` opens, and a pause
    after every pass; records the prompts in the order it was asked to answer them."""

    def __init__(self, engine: Engine, pause_s: float = 0.0) -> None:
        self.engine, self.pause_s = engine, pause_s
        self.gate, self.prompts, self.passes = threading.Event(), [], 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, prompt_ids, config):
        self.prompts.append(list(prompt_ids))
        self.gate.wait(30)
        for event in self.engine.generate(prompt_ids, config):
            self.passes += 1
            yield event
            time.sleep(self.pause_s)


def post_in_thread(address, messages, results: list) -> threading.Thread:
    body = json.dumps({"messages": messages, "temperature": 0}).encode()
    thread = threading.Thread(target=lambda: results.append(raw(address, "POST", "/v1/chat/completions", body)))
    thread.start()
    return thread


def wait_until(condition, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_requests_are_served_in_arrival_order_and_one_over_the_queue_gets_429(pipeline):
    engine = GatedEngine(pipeline.engine)
    service = service_for(pipeline, engine, queue_size=1)
    conversations = [[{"role": "user", "content": word}] for word in ("sea", "moon", "fish")]
    results: list = []
    with running(service) as address:
        first = post_in_thread(address, conversations[0], results)
        wait_until(lambda: len(engine.prompts) == 1)  # the first is being answered (held at the gate)
        second = post_in_thread(address, conversations[1], results)
        wait_until(lambda: service.queue.qsize() == 1)
        status, text = raw(address, "POST", "/v1/chat/completions", json.dumps({"messages": conversations[2]}).encode())
        engine.gate.set()
        first.join(30), second.join(30)
    assert status == 429 and json.loads(text)["error"] == {
        "message": "the server is busy: 1 requests are already waiting; retry later",
        "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded",
    }
    assert [code for code, _ in results] == [200, 200]
    assert engine.prompts == [pipeline.encode_chat(c) for c in conversations[:2]]


def test_a_client_that_leaves_mid_stream_stops_its_reply_and_the_next_request_is_served_exactly(pipeline, caplog):
    engine = GatedEngine(pipeline.engine, pause_s=0.05)
    engine.gate.set()
    long = GenerationConfig(budget=4, max_new_tokens=300)
    caplog.set_level(logging.INFO, logger="specchat.server")
    with running(service_for(pipeline, engine, settings=long)) as address:
        connection = http.client.HTTPConnection(*address, timeout=30)
        body = json.dumps({"messages": [{"role": "user", "content": "a deep tide"}], "stream": True, "temperature": 0})
        connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
        connection.close()  # the client goes away mid-reply
        wait_until(lambda: "the client left" in caplog.text)
        passes = engine.passes
        completion = client(address).chat.completions.create(model="m", messages=HELLO, temperature=0, max_tokens=8)
    assert passes < 100  # it stopped: far from the 300 tokens it was asked for
    assert completion.choices[0].message.content == fresh_reply(pipeline, HELLO).text


def test_eight_concurrent_clients_each_get_their_own_complete_greedy_reply(pipeline):
    conversations = [[{"role": "user", "content": f"wave {n} of the sea"}] for n in range(8)]
    replies: dict[int, str] = {}

    def ask(n: int) -> None:
        completion = client(address).chat.completions.create(model="m", messages=conversations[n], temperature=0, max_tokens=8)
        replies[n] = completion.choices[0].message.content

    with running(service_for(pipeline, queue_size=8)) as address:
        threads = [threading.Thread(target=ask, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert replies == {n: fresh_reply(pipeline, c).text for n, c in enumerate(conversations)}


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_two_hundred_sequential_requests_leave_the_servers_memory_flat(pipeline):
    """RSS after 200 more requests (new conversations, extended ones, streamed and not) stays
    within 5% of its level after a warm-up of 20."""
    def request(api, n: int) -> None:
        messages = [{"role": "user", "content": f"tide {n % 13}"}]
        if n % 3 == 1:
            messages += [{"role": "assistant", "content": "a wave"}, {"role": "user", "content": f"and {n}"}]
        if n % 2:
            "".join(chunk.choices[0].delta.content or "" for chunk in api.chat.completions.create(
                model="m", messages=messages, temperature=0, max_tokens=6, stream=True) if chunk.choices)
        else:
            api.chat.completions.create(model="m", messages=messages, temperature=0.8, seed=n, max_tokens=6)

    with running(service_for(pipeline)) as address:
        api = client(address)
        for n in range(20):
            request(api, n)
        warm = resident_bytes()
        for n in range(200):
            request(api, n)
        after = resident_bytes()
    assert after <= warm * 1.05, f"RSS grew from {warm / 2**20:.1f} MiB to {after / 2**20:.1f} MiB"


def test_sampled_replies_with_a_seed_repeat(pipeline):
    request = {"model": "m", "messages": HELLO, "temperature": 1.0, "top_p": 0.9, "seed": 7, "max_tokens": 12}
    with running(service_for(pipeline)) as address:
        api = client(address)
        first, second = (api.chat.completions.create(**request).choices[0].message.content for _ in range(2))
    assert first == second


def test_a_stop_string_ends_the_reply_before_it(pipeline):
    expected = fresh_reply(pipeline, HELLO, GenerationConfig(max_new_tokens=8)).text
    stop = expected.strip()[2:4]
    with running(service_for(pipeline)) as address:
        completion = client(address).chat.completions.create(model="m", messages=HELLO, temperature=0, stop=[stop])
    assert completion.choices[0].finish_reason == "stop" and stop not in completion.choices[0].message.content
    assert expected.startswith(completion.choices[0].message.content)


# -- the command line -------------------------------------------------------------------------
runner = CliRunner()


@pytest.mark.parametrize("args, line", [
    (["--port", "70000"], "error: --port must be from 0 to 65535, got 70000; 0 takes any free port"),
    (["--queue-size", "-1"], "error: --queue-size must be 0 or more, got -1"),
    (["--api-key", " "], "error: --api-key (or SPECCHAT_API_KEY) is empty; give a key or leave it out"),
    (["--host", "no-such-host.invalid"], None),
])
def test_bad_serve_options_are_one_line_before_any_model_loads(args, line):
    result = runner.invoke(app, ["serve", "--model", "/no/such/model", *args])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    if line:
        assert result.stderr.strip() == line
    else:
        assert result.stderr.startswith("error: cannot serve on host 'no-such-host.invalid'")


def test_a_port_in_use_is_one_line_before_any_model_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["serve", "--model", "/no/such/model", "--port", str(port)])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: port {port} on 127.0.0.1 is already in use; stop what listens there or choose another --port"


@pytest.mark.parametrize("stop_with", [signal.SIGTERM, signal.SIGINT])
def test_specchat_serve_answers_then_stops_cleanly_on_a_signal(tiny_dirs, stop_with):
    command = [sys.executable, "-m", "specchat", "serve", "--model", str(tiny_dirs["target"]), "--draft", str(tiny_dirs["draft"]),
               "--draft-quant", "none", "--budget", "4", "--max-new-tokens", "8", "--port", "0", "--api-key", "k"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    try:
        lines = []
        while not (match := re.search(r"at http://127\.0\.0\.1:(\d+)/v1", lines[-1] if lines else "")):
            line = process.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        completion = client(("127.0.0.1", int(match.group(1))), key="k").chat.completions.create(model="m", messages=HELLO)
        process.send_signal(stop_with)
        rest = process.stderr.read()
        assert process.wait(30) == 0, rest
    finally:
        process.kill()
    assert completion.choices[0].message.content and completion.usage.completion_tokens >= 1
    assert "chat completion: " in rest and "tokens/pass" in rest  # the request's log line
    assert rest.rstrip().endswith(f"stopped ({stop_with.name})") and "Traceback" not in rest


def test_a_stop_ends_a_running_stream_with_an_error_and_refuses_new_requests(pipeline):
    engine = GatedEngine(pipeline.engine, pause_s=0.05)
    engine.gate.set()
    service = service_for(pipeline, engine, settings=GenerationConfig(budget=4, max_new_tokens=300))
    with running(service) as address:
        stream = client(address).chat.completions.create(model="m", messages=HELLO, stream=True)
        first = next(iter(stream))
        service.stop()
        with pytest.raises(openai.APIError, match="the server is shutting down"):
            for _ in stream:
                pass
        status, text = raw(address, "POST", "/v1/chat/completions", json.dumps({"messages": HELLO}).encode())
        health = json.loads(raw(address, "GET", "/health")[1])
    assert first.choices[0].delta.role == "assistant" and engine.passes < 100
    assert status == 503 and json.loads(text)["error"]["message"] == "the server is shutting down"
    assert health["status"] == "stopping"


def test_served_replies_count_for_draft_auto_as_run_and_chat_replies_do(pipeline):
    from specchat.app.draftspeed import speed_file

    service = ChatService(pipeline.engine, pipeline.encode_chat, pipeline.target_name, SETTINGS, generate=pipeline.generate)
    with running(service) as address:
        client(address).chat.completions.create(model="any-name", messages=HELLO, temperature=0)
    [(key, entry)] = json.loads(speed_file().read_text()).items()
    assert f"draft={pipeline.draft_name}" in key and "greedy" in key and entry["tokens"] >= 1
