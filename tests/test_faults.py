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


@pytest.mark.parametrize("moment", ["import", "load"])
def test_ctrl_c_at_import_or_load_exits_130_with_one_line(tiny_dirs, tmp_path, moment):
    command = [sys.executable, "-m", "specchat", *base_args(tiny_dirs, "--budget", "4")]
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(PROMPT)
    process = subprocess.Popen(command, stdin=prompt.open(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if moment == "import":
        time.sleep(0.3)
    else:
        assert process.stderr.readline().startswith("loading")
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "interrupted" and stdout == ""
