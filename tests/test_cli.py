"""`specchat run` end to end on tiny models saved to disk: exact output, JSON, stdin, errors."""

import json

import pytest
import torch
from typer.testing import CliRunner

from specchat.cli.app import app
from specchat.engine.config import GenerationConfig
from specchat.engine.engine import Engine
from specchat.model.loading import load_resident
from specchat.app.loader import encode_chat

runner = CliRunner()


def expected_reply(tiny_dirs, prompt: str, n: int, system: str | None = None) -> tuple[str, list[int]]:
    target = load_resident(tiny_dirs["target"], torch.float32)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    ids = encode_chat(target.tokenizer, messages)
    engine = Engine(target.lm, None, target.tokenizer, target.eos_token_ids)
    done = list(engine.generate(ids, GenerationConfig(method="ar", max_new_tokens=n)))[-1]
    return done.text, list(done.token_ids)


def base_args(tiny_dirs, *extra):
    return ["run", "--model", str(tiny_dirs["target"]), "--draft", str(tiny_dirs["draft"]), *extra]


def test_run_prints_exactly_the_greedy_reply(tiny_dirs):
    text, _ = expected_reply(tiny_dirs, "the blue sea", 20)
    result = runner.invoke(app, base_args(tiny_dirs, "--max-new-tokens", "20", "the blue sea"))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == text + "\n"
    assert f"draft {tiny_dirs['draft']}: as configured (--draft, SPECCHAT_DRAFT or the config file)" in result.stderr


@pytest.mark.parametrize("method", ["specexec", "specinfer", "ar"])
def test_every_method_gives_the_same_greedy_reply(tiny_dirs, method):
    text, _ = expected_reply(tiny_dirs, "a calm tide", 16)
    result = runner.invoke(app, base_args(tiny_dirs, "--method", method, "--max-new-tokens", "16", "a calm tide"))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == text + "\n"


def test_stdin_prompt_and_dash(tiny_dirs):
    text, _ = expected_reply(tiny_dirs, "deep sea fish", 12)
    for args in (base_args(tiny_dirs, "--max-new-tokens", "12"), base_args(tiny_dirs, "--max-new-tokens", "12", "-")):
        result = runner.invoke(app, args, input="deep sea fish\n")
        assert result.exit_code == 0, result.stderr
        assert result.stdout == text + "\n"


def test_system_prompt_goes_through_the_template(tiny_dirs):
    text, _ = expected_reply(tiny_dirs, "the moon", 12, system="salt wind")
    result = runner.invoke(app, base_args(tiny_dirs, "--max-new-tokens", "12", "--system", "salt wind", "the moon"))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == text + "\n"


def test_json_output_schema(tiny_dirs):
    text, tokens = expected_reply(tiny_dirs, "the blue sea", 10)
    result = runner.invoke(app, base_args(tiny_dirs, "--json", "--max-new-tokens", "10", "--budget", "8", "the blue sea"))
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert set(payload) == {"text", "tokens", "stats"}
    assert payload["text"] == text and payload["tokens"] == tokens
    assert set(payload["stats"]) == {
        "method", "budget", "new_tokens", "target_passes", "tokens_per_pass", "tokens_per_s",
        "wall_s", "prefill_s", "draft_s", "target_s", "disk_read_bytes", "finish_reason", "draft",
    }
    assert payload["stats"]["draft"]["name"] == str(tiny_dirs["draft"]) and payload["stats"]["draft"]["bits"] == 8
    assert payload["stats"]["draft"]["bytes"] > 0
    assert payload["stats"]["method"] == "specexec" and payload["stats"]["budget"] == 8
    assert payload["stats"]["finish_reason"] in ("eos", "length") and (payload["stats"]["finish_reason"] == "length") == (len(tokens) == 10)
    assert payload["stats"]["new_tokens"] == len(tokens)


def test_config_file_and_environment_apply_with_flags_winning(tiny_dirs, tmp_path, monkeypatch):
    config = tmp_path / "c.toml"
    config.write_text(f'model = "{tiny_dirs["target"]}"\ndraft = "none"\nmax_new_tokens = 5\nmethod = "ar"\n')
    monkeypatch.setenv("SPECCHAT_MAX_NEW_TOKENS", "7")
    result = runner.invoke(app, ["run", "--config", str(config), "--json", "the sea"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["stats"]["new_tokens"] == 7
    result = runner.invoke(app, ["run", "--config", str(config), "--json", "--max-new-tokens", "3", "the sea"])
    assert json.loads(result.stdout)["stats"]["new_tokens"] == 3


BAD_INPUTS = [
    # (id, extra args, stdin, config file text, expected fragment of the error line)
    ("missing-path", ["--model", "/nonexistent/model.gguf"], None, None, "does not exist"),
    ("unknown-name", ["--model", "no-such-model"], None, None, "unknown model 'no-such-model'"),
    ("pickle", ["--model", "weights.bin"], None, None, "pickle checkpoint"),
    ("tokenizer-mismatch", ["--draft", "ALIEN"], None, None, "does not share the target's tokenizer"),
    ("damaged-safetensors", ["--model", "DAMAGED", "--draft", "none"], None, None, "is not a readable safetensors file"),
    ("empty-stdin", [], "   \n", None, "the prompt is empty"),
    ("non-utf8-stdin", [], b"the sea \xff\xfe", None, "not UTF-8"),
    ("too-long", ["LONG"], None, None, "prompt is"),
    ("budget-zero", ["--budget", "0"], None, None, "budget must be >= 1"),
    ("budget-negative", ["--budget", "-4"], None, None, "budget must be >= 1"),
    ("max-new-negative", ["--max-new-tokens", "-1"], None, None, "max_new_tokens must be >= 1"),
    ("top-p-zero", ["--top-p", "0"], None, None, "top_p must be in (0, 1]"),
    ("top-p-big", ["--top-p", "1.5"], None, None, "top_p must be in (0, 1]"),
    ("temperature-negative", ["--temperature", "-1"], None, None, "temperature must be a finite number >= 0"),
    ("temperature-inf", ["--temperature", "inf"], None, None, "temperature must be a finite number >= 0"),
    ("method", ["--method", "beam"], None, None, "--method must be one of"),
    ("ram-budget", ["--ram-budget", "lots"], None, None, "not a size"),
    ("config-toml", [], None, "model = [unclosed", "is not valid TOML"),
    ("config-key", [], None, 'max_new_tokens = 4\ncolour = "blue"\n', "line 2: unknown key 'colour'"),
    ("config-value", [], None, 'budget = "many"\n', "bad value for budget"),
    ("config-missing", ["--config", "/nonexistent/specchat.toml"], None, None, "does not exist"),
    ("draft-batch-zero", ["--draft-batch", "0"], None, None, "draft_batch must be >= 1"),
    ("draft-batch-word", ["--draft-batch", "many"], None, None, "bad value for draft_batch"),
    ("device-unknown", ["--device", "tpu"], None, None, "--device must be one of auto, cpu, cuda"),
    ("self-draft-kind", ["--draft", "self:int3"], None, None, "a self draft is one of self, self:int8, self:int4"),
    ("seed-huge", ["--seed", "99999999999999999999999"], None, None, "seed must be a whole number from 0 to 9223372036854775807"),
    ("seed-negative", ["--seed", "-1"], None, None, "seed must be a whole number from 0"),
    ("budget-huge", ["--budget", "100000"], None, None, "--budget 100000 needs about"),
    ("config-directory", ["--config", "/tmp"], None, None, "config file /tmp (from --config) is a directory"),
    ("store-is-a-file", ["--offload", "ssd", "--store", "FILE"], None, None, "a part of the path is a file, not a directory"),
    ("store-in-proc", ["--offload", "ssd", "--store", "/proc/specchat-store"], None, None, "cannot use /proc/specchat-store"),
    *([("device-cuda-absent", ["--device", "cuda"], None, None, "torch sees no CUDA GPU")] if not torch.cuda.is_available() else []),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gives_one_error_line_and_a_nonzero_exit(tiny_dirs, tmp_path, case):
    _, extra, stdin, config_text, fragment = case
    extra = [str(tiny_dirs["alien"]) if a == "ALIEN" else a for a in extra]
    if "DAMAGED" in extra:  # a model directory whose weights file is garbage
        import shutil

        damaged = tmp_path / "damaged"
        shutil.copytree(tiny_dirs["target"], damaged)
        for weights in damaged.glob("*.safetensors"):
            weights.write_bytes(b"\xff" * 64)
        extra = [str(damaged) if a == "DAMAGED" else a for a in extra]
    extra = ["sea " * 600 if a == "LONG" else a for a in extra]
    if "FILE" in extra:
        (tmp_path / "a-file").write_text("x")
        extra = [str(tmp_path / "a-file") if a == "FILE" else a for a in extra]
    args = base_args(tiny_dirs, "--max-new-tokens", "4")
    if "--model" in extra:
        args = ["run", "--max-new-tokens", "4"]
    if config_text is not None:
        config = tmp_path / "config.toml"
        config.write_text(config_text)
        extra = ["--config", str(config), *extra]
    if stdin is None and not any(a.startswith("sea ") for a in extra):
        extra = [*extra, "the sea"]
    result = runner.invoke(app, [*args, *extra], input=stdin)
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and fragment in lines[-1], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_specchat_config_naming_no_file_is_one_line_naming_it(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECCHAT_CONFIG", str(tmp_path / "gone.toml"))
    result = runner.invoke(app, base_args(tiny_dirs, "the sea"))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: config file {tmp_path / 'gone.toml'} does not exist; check the SPECCHAT_CONFIG path"
    ]


def test_ctrl_c_during_run_flushes_the_partial_reply_and_exits_130(tiny_dirs, monkeypatch):
    from specchat.engine import engine as engine_module
    from specchat.engine.events import TextEvent

    def interrupted(self, prompt_ids, config):
        yield TextEvent("partial", (5,), 0, 0, 0.0, 0.0)
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_module.Engine, "generate", interrupted)
    result = runner.invoke(app, base_args(tiny_dirs, "the sea"))
    assert result.exit_code == 130
    assert result.stdout == "partial\n"
    assert result.stderr.strip().splitlines()[-1] == "interrupted"


def test_not_enough_ram_is_refused_before_loading(tiny_dirs, monkeypatch):
    import psutil

    class Tiny:
        available = 1000
        total = 1000

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tiny())
    result = runner.invoke(app, base_args(tiny_dirs, "--offload", "none", "the sea"))
    assert result.exit_code != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: not enough RAM to hold the models")


def test_not_enough_disk_for_the_layer_store_is_refused_before_writing_it(tiny_dirs, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 4096, 4096))
    stores = tmp_path / "stores"
    result = runner.invoke(app, base_args(tiny_dirs, "--offload", "ssd", "--store", str(stores), "the sea"))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: not enough disk for the layer store")
    assert not list(stores.rglob("layer_*"))


@pytest.mark.parametrize("offload", ["ssd", "none"])
def test_4bit_target_runs_and_speculation_still_matches_plain_decoding(tiny_dirs, tmp_path, offload):
    stores = tmp_path / "stores"
    args = base_args(tiny_dirs, "--quant", "4bit", "--offload", offload, "--store", str(stores), "--max-new-tokens", "12")
    replies = {}
    for method in ("ar", "specexec", "specinfer"):
        result = runner.invoke(app, [*args, "--method", method, "--json", "a calm tide"])
        assert result.exit_code == 0, result.stderr
        assert "4-bit NF4" in result.stderr
        replies[method] = json.loads(result.stdout)["tokens"]
    assert replies["specexec"] == replies["ar"] == replies["specinfer"]
    assert len(replies["ar"]) == 12
    assert [p.name.endswith("-nf4") for p in stores.iterdir()] == [True]


def test_budget_auto_calibrates_once_per_settings_and_a_fixed_budget_never(tiny_dirs):
    from specchat.app.calibration import calibration_file

    fixed = runner.invoke(app, base_args(tiny_dirs, "--budget", "8", "--max-new-tokens", "4", "the sea"))
    assert fixed.exit_code == 0, fixed.stderr
    assert "measuring pass times" not in fixed.stderr and not calibration_file().exists()
    first = runner.invoke(app, base_args(tiny_dirs, "--max-new-tokens", "4", "the sea"))
    assert first.exit_code == 0, first.stderr
    assert "measuring pass times for --budget auto" in first.stderr and calibration_file().is_file()
    second = runner.invoke(app, base_args(tiny_dirs, "--max-new-tokens", "4", "the sea"))
    assert second.exit_code == 0, second.stderr
    assert "measuring pass times" not in second.stderr
    assert second.stdout == first.stdout


@pytest.mark.parametrize(
    "error, code",
    [
        (MemoryError(), 3),
        (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 8GB"), 3),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), 3),
    ],
)
def test_an_allocation_failure_is_one_error_line_and_exit_3(tiny_dirs, monkeypatch, error, code):
    from specchat.engine import engine as engine_module

    def fail(self, prompt_ids, config):
        raise error
        yield

    monkeypatch.setattr(engine_module.Engine, "generate", fail)
    result = runner.invoke(app, base_args(tiny_dirs, "the sea"))
    assert result.exit_code == code
    assert result.stderr.strip().splitlines()[-1].startswith("error: out of memory; use --offload ssd")
    assert "Traceback" not in result.stderr


def test_other_runtime_errors_are_not_called_out_of_memory(tiny_dirs, monkeypatch):
    from specchat.engine import engine as engine_module

    def fail(self, prompt_ids, config):
        raise RuntimeError("shape mismatch")
        yield

    monkeypatch.setattr(engine_module.Engine, "generate", fail)
    result = runner.invoke(app, base_args(tiny_dirs, "the sea"))
    assert result.exit_code != 0 and isinstance(result.exception, RuntimeError)
