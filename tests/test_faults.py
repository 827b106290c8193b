"""Fault injection: every write path under a full disk, a read-only or forbidden place, and a kill
between writing a file and renaming it into place; two processes building one store; Ctrl-C at
import, load, prefill and mid-pass.  Each must end in one error line (or a warning and the
answer), the right exit status, no traceback, and a next run that resumes or rebuilds and
answers exactly as a clean run does."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from specchat.cli.app import app

runner = CliRunner()
FAULTRUN = str(Path(__file__).with_name("faultrun.py"))
PROMPT = "the blue sea\n"
ERRORS = {
    "full disk": (errno.ENOSPC, "No space left on device"),
    "read-only": (errno.EROFS, "Read-only file system"),
    "forbidden": (errno.EACCES, "Permission denied"),
}


def base_args(tiny_dirs, *extra) -> list[str]:
    return ["run", "--model", str(tiny_dirs["target"]), "--draft", str(tiny_dirs["draft"]), "--dtype", "float32",
            "--max-new-tokens", "6", "--json", *extra]


def stores(tmp_path) -> list[str]:
    return ["--store", str(tmp_path / "stores")]


# (what is written, the file the fault hits, the run's own options, whether the run must refuse)
WRITES = {
    "store layer": ("layer_000.bin", lambda tmp: ["--offload", "ssd", "--budget", "4", *stores(tmp)], True),
    "store resident file": ("resident.safetensors", lambda tmp: ["--offload", "ssd", "--budget", "4", *stores(tmp)], True),
    "store manifest": ("manifest.json", lambda tmp: ["--offload", "ssd", "--budget", "4", *stores(tmp)], True),
    "self draft layer": ("layer_000.safetensors", lambda tmp: ["--draft", "self", "--budget", "4", *stores(tmp)], False),
    "calibration": ("calibration.json", lambda tmp: ["--budget", "auto"], False),
}


@pytest.fixture(scope="module")
def reference(tiny_dirs) -> list[int]:
    """The tokens every run below must give (greedy, float32: streamed == resident == speculative)."""
    result = runner.invoke(app, base_args(tiny_dirs, "--budget", "4"), input=PROMPT)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)["tokens"]


def failing_replace(monkeypatch, name: str, error: str) -> None:
    """os.replace into a file called ``name`` fails as the disk or file system would."""
    real, (number, text) = os.replace, ERRORS[error]

    def replace(src, dst, *args, **kwargs):
        if os.path.basename(str(dst)) == name:
            raise OSError(number, text, str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def one_clean_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    [line] = [line for line in stderr.splitlines() if line.startswith("error:")]
    return line


@pytest.mark.parametrize("error", list(ERRORS))
@pytest.mark.parametrize("write", list(WRITES))
def test_a_failed_write_is_one_line_and_the_next_run_recovers(tiny_dirs, tmp_path, monkeypatch, reference, write, error):
    name, options, refuses = WRITES[write]
    args = base_args(tiny_dirs, *options(tmp_path))
    with monkeypatch.context() as patch:
        failing_replace(patch, name, error)
        faulty = runner.invoke(app, args, input=PROMPT)
    if refuses:
        assert faulty.exit_code == 2, faulty.stderr
        line = one_clean_line(faulty.stderr)
        assert name in line and ("free some space" in line if error == "full disk" else "cannot use" in line)
        assert faulty.stdout == ""
    else:  # a cache that cannot be kept costs only time: warned, and the answer is given
        assert faulty.exit_code == 0, faulty.stderr
        assert "Traceback" not in faulty.stderr and "cannot" in faulty.stderr
        assert json.loads(faulty.stdout)["tokens"] == reference
    again = runner.invoke(app, args, input=PROMPT)
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["tokens"] == reference


def run_with_fault(fault: str, name: str, args: list[str], stdin: str = PROMPT, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, FAULTRUN, fault, name, "--", *args], input=stdin, capture_output=True, text=True, timeout=300, **popen
    )


@pytest.mark.parametrize("write", list(WRITES))
def test_a_kill_between_writing_a_file_and_renaming_it_is_never_trusted(tiny_dirs, tmp_path, reference, write):
    name, options, _ = WRITES[write]
    args = base_args(tiny_dirs, *options(tmp_path))
    killed = run_with_fault("kill", name, args)
    assert killed.returncode == 137, killed.stderr
    again = runner.invoke(app, args, input=PROMPT)
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["tokens"] == reference
    if write.startswith("store"):
        [store] = (tmp_path / "stores").iterdir()
        assert (store / "manifest.json").is_file() and not list(store.glob("*.partial"))


def chat_args(tiny_dirs) -> list[str]:
    return ["chat", "--model", str(tiny_dirs["target"]), "--draft", str(tiny_dirs["draft"]), "--dtype", "float32",
            "--max-new-tokens", "4", "--budget", "4"]


@pytest.mark.parametrize("error", list(ERRORS))
def test_a_session_that_cannot_be_saved_is_one_line_and_the_chat_goes_on(tiny_dirs, tmp_path, monkeypatch, error):
    path = tmp_path / "s.json"
    with monkeypatch.context() as patch:
        failing_replace(patch, "s.json", error)
        result = runner.invoke(app, chat_args(tiny_dirs), input=f"the sea\n/save {path}\n/stats\n")
    assert result.exit_code == 0, result.stderr
    assert one_clean_line(result.stderr).startswith(f"error: cannot save the session to {path}")
    assert "session: 1 replies" in result.stdout and not path.exists()


def test_a_kill_while_saving_a_session_keeps_the_old_file(tiny_dirs, tmp_path):
    path = tmp_path / "s.json"
    first = runner.invoke(app, chat_args(tiny_dirs), input=f"the sea\n/save {path}\n")
    assert first.exit_code == 0, first.stderr
    saved = path.read_bytes()
    killed = run_with_fault("kill", "s.json", chat_args(tiny_dirs), stdin=f"a calm tide\n/save {path}\n")
    assert killed.returncode == 137 and path.read_bytes() == saved
    resumed = runner.invoke(app, [*chat_args(tiny_dirs), "--resume", str(path)], input="/stats\n")
    assert resumed.exit_code == 0 and "resumed 2 messages" in resumed.stderr


def setup_args(tiny_dirs, tmp_path) -> list[str]:
    return ["setup", str(tiny_dirs["target"]), "--draft", "none", "--offload", "ssd", *stores(tmp_path), "--yes"]


@pytest.mark.parametrize("error", list(ERRORS))
def test_a_config_that_cannot_be_written_is_one_line_and_the_old_one_stays(tiny_dirs, tmp_path, monkeypatch, error):
    config = Path(os.environ["XDG_CONFIG_HOME"]) / "specchat" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('model = "demo"\n')
    with monkeypatch.context() as patch:
        failing_replace(patch, "config.toml", error)
        result = runner.invoke(app, setup_args(tiny_dirs, tmp_path))
    assert result.exit_code == 2, result.stderr
    assert "config.toml" in one_clean_line(result.stderr)
    assert config.read_text() == 'model = "demo"\n'
    killed = run_with_fault("kill", "config.toml", setup_args(tiny_dirs, tmp_path), stdin="")
    assert killed.returncode == 137 and config.read_text() == 'model = "demo"\n'
    assert runner.invoke(app, setup_args(tiny_dirs, tmp_path)).exit_code == 0
    assert str(tiny_dirs["target"]) in config.read_text()


def test_two_processes_building_one_store_both_answer_and_one_waits(tiny_dirs, tmp_path, reference):
    """Each layer file takes a second to land, so the two builds overlap."""
    args = [sys.executable, FAULTRUN, "slow", "layer_", "--", *base_args(tiny_dirs, "--offload", "ssd", "--budget", "4", *stores(tmp_path))]
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(PROMPT)
    first, second = (
        subprocess.Popen(args, stdin=prompt.open(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    )
    outputs = [process.communicate(timeout=300) for process in (first, second)]
    for process, (stdout, stderr) in zip((first, second), outputs):
        assert process.returncode == 0, stderr
        assert "Traceback" not in stderr and json.loads(stdout)["tokens"] == reference
    assert any("waiting for another specchat process to finish building" in stderr for _, stderr in outputs)
    [store] = (tmp_path / "stores").iterdir()
    assert sorted(p.name for p in store.glob("layer_*")) == ["layer_000.bin", "layer_001.bin"]


@pytest.mark.parametrize("forward, where", [(1, "prefill"), (25, "a pass")])
def test_ctrl_c_in_prefill_or_a_pass_exits_130_with_the_partial_json(tiny_dirs, forward, where):
    result = run_with_fault("sigint", str(forward), base_args(tiny_dirs, "--budget", "4", "--max-new-tokens", "30"))
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.strip().splitlines()[-1] == "interrupted"
    payload = json.loads(result.stdout)
    assert payload["stats"]["finish_reason"] == "interrupted"
    assert (payload["tokens"] == []) == (where == "prefill")


@pytest.mark.parametrize("moment", [0.2, 0.6, 1.2, "load"])  # seconds into the imports, or as the target starts loading
def test_ctrl_c_at_import_or_load_exits_130_with_one_line(tiny_dirs, tmp_path, moment):
    """A Ctrl-C before the first forward prints no reply at all.  ``load`` signals from inside the
    process: a signal sent once "loading" is printed can land after the tiny models have loaded."""
    if moment == "load":
        result = run_with_fault("sigint", "load", base_args(tiny_dirs, "--budget", "4"))
        returncode, stdout, stderr = result.returncode, result.stdout, result.stderr
    else:
        command = [sys.executable, "-m", "specchat", *base_args(tiny_dirs, "--budget", "4")]
        prompt = tmp_path / "prompt.txt"
        prompt.write_text(PROMPT)
        process = subprocess.Popen(command, stdin=prompt.open(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(moment)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
        returncode = process.returncode
    assert returncode in (130, -signal.SIGINT), stderr  # a Ctrl-C landing in the interpreter's exit kills it by SIGINT
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "interrupted" and stdout == ""


# -- the parts, in-process ---------------------------------------------------------------------


@pytest.mark.parametrize("number, where, fragments", [
    (errno.EROFS, "cache", ["the file system is read-only", "set XDG_CACHE_HOME (or --store, for the stores)"]),
    (errno.EACCES, "config", ["permission denied", "set XDG_CONFIG_HOME"]),
    (errno.ENOTDIR, "elsewhere", ["a part of the path is a file, not a directory", "check the path"]),
    (errno.ENOSPC, "elsewhere", ["the disk is full", "free some space"]),
])
def test_a_file_system_error_is_one_line_naming_the_path_and_the_setting(tmp_path, monkeypatch, number, where, fragments):
    from specchat.cli.boundary import path_error_line
    from specchat.common.paths import cache_dir, config_file

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = {"cache": cache_dir() / "stores", "config": config_file(), "elsewhere": tmp_path / "x" / "y"}[where]
    line = path_error_line(OSError(number, os.strerror(number), str(path)))
    assert line.startswith(f"error: cannot use {path}: ") and all(f in line for f in fragments)


def test_a_damaged_resident_file_is_noticed_and_written_again(tiny_dirs, tmp_path):
    from specchat.weights.store import RESIDENT, build_store

    notes: list[str] = []
    store = build_store(tiny_dirs["target"], tmp_path / "store", "float16")
    resident = store.path / RESIDENT
    good = resident.read_bytes()
    resident.write_bytes(good[:200] + bytes(b ^ 0xFF for b in good[200:216]) + good[216:])  # a few flipped bytes
    build_store(tiny_dirs["target"], store.path, "float16", notice=notes.append)
    assert resident.read_bytes() == good
    assert notes == [f"{resident} is damaged (checksum mismatch); writing it again from the checkpoint"]
    build_store(tiny_dirs["target"], store.path, "float16", notice=notes.append)
    assert len(notes) == 1  # a sound store is only read


def test_a_second_builder_waits_for_the_lock_then_finds_the_store_built(tiny_dirs, tmp_path):
    import threading

    from specchat.common.files import LOCK, build_lock
    from specchat.weights.store import build_store

    path, notes, built = tmp_path / "store", [], []
    with build_lock(path / LOCK):  # another process is building
        worker = threading.Thread(target=lambda: built.append(build_store(tiny_dirs["target"], path, "float16", notice=notes.append)))
        worker.start()
        worker.join(timeout=1.0)
        assert worker.is_alive() and notes == [f"waiting for another specchat process to finish building {path}"]
    worker.join(timeout=60)
    assert built and built[0].num_layers == 2


def test_auto_budget_never_picks_a_tree_the_ram_cannot_hold():
    from specchat.engine.autobudget.costmodel import Calibration, CostModelTuner

    sizes = (1, 16, 64, 256, 1024)
    calibration = Calibration({k: 1.0 for k in sizes}, {"specexec": {k: 0.01 for k in sizes}})  # big trees cost nothing
    assert CostModelTuner(calibration, "specexec", 32).best() == 1024
    tuner = CostModelTuner(calibration, "specexec", 32, largest=100)
    assert tuner.best() == 64 and tuner.candidates[-1] == 64


def test_the_tree_preflight_names_the_largest_budget_that_fits(tiny_dirs):
    import torch

    from specchat.common.errors import ResourceError
    from specchat.model.placement import check_tree, largest_tree, tree_bytes
    from specchat.sources.facts import read_facts

    facts = read_facts(tiny_dirs["target"])
    available = tree_bytes(facts, 64, torch.float32) + 1
    assert largest_tree(facts, torch.float32, available) == 64
    check_tree(facts, 64, torch.float32, available)
    with pytest.raises(ResourceError) as refused:
        check_tree(facts, 128, torch.float32, available)
    assert refused.value.line().startswith("error: --budget 128 needs about ")
    assert refused.value.line().endswith("; use --budget 64 or less, or --budget auto")


def test_resume_keeps_the_flags_and_says_when_another_model_saved_the_session(tiny_dirs, tmp_path):
    path = tmp_path / "s.json"
    saved = runner.invoke(app, [*chat_args(tiny_dirs), "--max-new-tokens", "3"], input=f"the sea\n/set max_tokens 5\n/save {path}\n")
    assert saved.exit_code == 0, saved.stderr
    payload = json.loads(path.read_text())
    payload["target"] = "another-model"
    path.write_text(json.dumps(payload))
    resumed = runner.invoke(app, [*chat_args(tiny_dirs), "--max-new-tokens", "2", "--resume", str(path)], input="/stats\n")
    assert resumed.exit_code == 0, resumed.stderr
    assert "max_tokens 2" in resumed.stdout  # the flag, not the saved 5
    assert f"(saved with another-model; {tiny_dirs['target']} continues it" in resumed.stderr


def test_save_into_a_missing_folder_is_refused_as_a_shell_would(tiny_dirs, tmp_path):
    target = tmp_path / "no-such-dir" / "s.json"
    result = runner.invoke(app, chat_args(tiny_dirs), input=f"the sea\n/save {target}\n")
    assert result.exit_code == 0
    assert one_clean_line(result.stderr) == (
        f"error: cannot save the session to {target}: the folder {target.parent} does not exist; "
        "create it or choose another path; the conversation is still here"
    )
    assert not target.parent.exists()


@pytest.fixture
def fake_gguf(tiny_dirs, tmp_path, monkeypatch):
    """A ``.gguf`` file whose reading transformers is told to answer with the tiny target."""
    import transformers

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        real = cls.from_pretrained

        def from_pretrained(path, *args, _real=real, gguf_file=None, **kwargs):
            return _real(tiny_dirs["target"] if gguf_file else path, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", from_pretrained)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return gguf


@pytest.mark.parametrize("error", list(ERRORS))
def test_a_model_conversion_that_cannot_finish_leaves_nothing_trusted(tiny_dirs, fake_gguf, monkeypatch, error):
    args = ["run", "--model", str(fake_gguf), "--draft", "none", "--dtype", "float32", "--max-new-tokens", "4", "--json"]
    models = Path(os.environ["XDG_CACHE_HOME"]) / "specchat" / "models"
    with monkeypatch.context() as patch:
        real = os.replace

        def replace(src, dst, *rest, **kwargs):  # the converted folder's rename into place
            if os.path.basename(str(dst)).startswith("gguf-tiny-"):
                number, text = ERRORS[error]
                raise OSError(number, text, str(dst))
            return real(src, dst, *rest, **kwargs)

        patch.setattr(os, "replace", replace)
        faulty = runner.invoke(app, args, input=PROMPT)
    assert faulty.exit_code == 2, faulty.stderr
    line = one_clean_line(faulty.stderr)
    assert ("the disk filled up while converting tiny.gguf" in line) if error == "full disk" else ("cannot use" in line)
    assert [p.name for p in models.iterdir() if not p.name.startswith(".")] == []  # no folder to trust, no partial left
    again = runner.invoke(app, args, input=PROMPT)
    assert again.exit_code == 0, again.stderr
    assert "converting tiny.gguf to safetensors" in again.stderr and len(json.loads(again.stdout)["tokens"]) == 4
