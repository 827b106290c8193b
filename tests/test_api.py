"""The public Python API (``import specchat``) on tiny models: the same reply as `specchat run`."""

import subprocess
import sys

from typer.testing import CliRunner

import specchat
from specchat.cli.app import app

runner = CliRunner()


def settings(tiny_dirs, **changes):
    return specchat.RunConfig(model=str(tiny_dirs["target"]), draft=str(tiny_dirs["draft"]), budget=8, max_new_tokens=12, **changes)


def test_load_and_generate_give_the_reply_run_prints(tiny_dirs):
    lines = []
    pipeline = specchat.load(settings(tiny_dirs), progress=lines.append)
    assert isinstance(pipeline.engine, specchat.Engine) and pipeline.draft_reason.startswith(f"draft {tiny_dirs['draft']}")
    assert lines[0] == f"loading {tiny_dirs['target']}"
    text = specchat.generate(pipeline, "the blue sea")
    cli = runner.invoke(app, ["run", "--model", str(tiny_dirs["target"]), "--draft", str(tiny_dirs["draft"]),
                              "--budget", "8", "--max-new-tokens", "12", "the blue sea"])
    assert cli.exit_code == 0, cli.stderr
    assert cli.stdout == text + "\n"


def test_stream_generate_yields_text_per_pass_then_done(tiny_dirs):
    pipeline = specchat.load(settings(tiny_dirs))
    events = list(specchat.stream_generate(pipeline, [{"role": "user", "content": "a calm tide"}],
                                           specchat.GenerationConfig(method="specexec", budget=4, max_new_tokens=10)))
    *texts, done = events
    assert texts and all(isinstance(event, specchat.TextEvent) for event in texts)
    assert isinstance(done, specchat.DoneEvent) and done.text == "".join(event.text for event in texts)
    assert done.stats.target_passes == len(texts) and done.stats.new_tokens == len(done.token_ids)


def test_library_errors_are_specchat_errors(tmp_path):
    try:
        specchat.load(specchat.RunConfig(model=str(tmp_path / "absent")))
    except specchat.SpecchatError as exc:
        assert exc.what and exc.line().startswith("error: ")
    else:
        raise AssertionError("loading a missing model must fail")


def test_importing_the_api_does_not_import_torch():
    code = "import sys, specchat; print('torch' in sys.modules); specchat.RunConfig; print(specchat.__version__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", specchat.__version__]
