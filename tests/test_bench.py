import json

import pytest
from typer.testing import CliRunner

from specchat.bench import load_prompts
from specchat.cli import app
from specchat.errors import InputError

runner = CliRunner()


def test_bench_runs_every_configuration_interleaved_and_reports_json(tiny_dirs, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"turns": ["the sea", "x"]}\n{"prompt": "blue moon"}\n{"prompt": "unused"}\n')
    result = runner.invoke(app, [
        "bench", "--model", str(tiny_dirs["target"]), "--draft", str(tiny_dirs["draft"]), "--prompts", str(prompts),
        "--n", "2", "--budgets", "4,8", "--temperatures", "0,0.8", "--max-new-tokens", "6", "--json",
    ])
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    keys = [(r["method"], r["budget"], r["temperature"]) for r in payload["rows"]]
    assert keys == [
        ("specexec", 4, 0.0), ("specexec", 8, 0.0), ("specinfer", 4, 0.0), ("specinfer", 8, 0.0), ("ar", 0, 0.0),
        ("specexec", 4, 0.8), ("specexec", 8, 0.8), ("specinfer", 4, 0.8), ("specinfer", 8, 0.8), ("ar", 0, 0.8),
    ]
    for row in payload["rows"]:
        assert row["prompts"] == 2 and row["new_tokens"] > 0
        assert row["tokens_per_pass"] >= 1.0
    ar = [r for r in payload["rows"] if r["method"] == "ar"]
    assert all(r["ratio_to_ar"] == pytest.approx(1.0) and r["tokens_per_pass"] == 1.0 for r in ar)


def test_bench_table_output(tiny_dirs):
    result = runner.invoke(app, [
        "bench", "--model", str(tiny_dirs["target"]), "--draft", str(tiny_dirs["draft"]),
        "--n", "1", "--budgets", "4", "--temperatures", "0", "--methods", "specexec,ar", "--max-new-tokens", "4",
    ])
    assert result.exit_code == 0, result.stderr
    assert "specchat bench" in result.stdout and "tok/pass" in result.stdout
    assert "specexec" in result.stdout and "1.00x" in result.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--methods", "beam"], "unknown method 'beam'"),
        (["--budgets", "0"], "must be >= 1"),
        (["--budgets", "a,b"], "comma-separated list"),
        (["--prompts", "/nonexistent.jsonl"], "cannot read prompts file"),
    ],
)
def test_bench_bad_options(tiny_dirs, args, fragment):
    result = runner.invoke(app, ["bench", "--model", str(tiny_dirs["target"]), "--draft", str(tiny_dirs["draft"]), *args])
    assert result.exit_code != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error:") and fragment in result.stderr


def test_prompts_file_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": ["ok"]}\nnot json\n')
    with pytest.raises(InputError, match="line 2"):
        load_prompts(bad, 10)
    assert len(load_prompts(None, 80)) == 80


def test_streamed_bench_reports_the_physical_limit_and_recalibrates(tiny_dirs, tmp_path):
    result = runner.invoke(app, [
        "bench", "--model", str(tiny_dirs["target"]), "--draft", str(tiny_dirs["draft"]), "--offload", "ssd",
        "--ram-budget", "1", "--store", str(tmp_path), "--n", "1", "--budgets", "4,auto", "--temperatures", "0",
        "--methods", "specexec,ar", "--max-new-tokens", "6", "--calibrate", "--json",
    ])
    assert result.exit_code == 0, result.stderr
    assert "measuring pass times for --budget auto" in result.stderr
    payload = json.loads(result.stdout)
    bandwidth = payload["setup"]["stream_bytes_per_s"]
    assert bandwidth > 0
    for row in payload["rows"]:
        assert row["read_bytes_per_pass"] > 0
        expected = row["tokens_per_pass"] * bandwidth / row["read_bytes_per_pass"]
        assert row["physical_limit_tok_s"] == pytest.approx(expected)
        assert row["of_limit"] == pytest.approx(row["tokens_per_s"] / expected)
    assert [r["budget"] for r in payload["rows"]] == [4, -1, 0]
