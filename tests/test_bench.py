import json

import pytest
from typer.testing import CliRunner

from specchat.bench.sweep import load_prompts
from specchat.cli.app import app
from specchat.common.errors import InputError

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
        (["--budgets", "-1"], "must be >= 1"),  # not a hidden spelling of auto
        (["--budgets", "a,b"], "comma-separated list"),
        (["--prompts", "/nonexistent.jsonl"], "cannot read prompts file"),
        (["--methods", ""], "need at least one value"),
        (["--temperatures", "nan"], "--temperatures >= 0"),
        (["--draft", "none"], "needs a draft model, but the draft is 'none'"),
        (["--plot", "/nonexistent-dir/b.png"], "does not exist"),
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
    bad.write_text('{"prompt": 7}\n')
    with pytest.raises(InputError, match="line 1"):
        load_prompts(bad, 10)
    bad.write_bytes(b'{"prompt": "\xff"}\n')
    with pytest.raises(InputError, match="not UTF-8"):
        load_prompts(bad, 10)
    assert len(load_prompts(None, 80)) == 80


def test_streamed_bench_reports_the_physical_limit_and_recalibrates(tiny_dirs, tmp_path):
    result = runner.invoke(app, [
        "bench", "--model", str(tiny_dirs["target"]), "--draft", str(tiny_dirs["draft"]), "--offload", "ssd",
        "--ram-budget", "1", "--store", str(tmp_path), "--n", "1", "--budgets", "4,auto", "--temperatures", "0",
        "--methods", "specexec,ar", "--max-new-tokens", "6", "--calibrate", "--json", "--log", str(tmp_path / "log.jsonl"),
    ])
    assert result.exit_code == 0, result.stderr
    assert result.stderr.count("measuring pass times for --budget auto") == 1
    payload = json.loads(result.stdout)
    bandwidth = payload["setup"]["stream_bytes_per_s"]
    # The limit's bandwidth is the disk as the runs saw it: bytes the streamer read / seconds it spent reading.
    assert payload["setup"]["stream_measured"] == "read during the runs"
    reads = [r for r in _log_lines(tmp_path / "log.jsonl") if r["kind"] == "reads"]
    assert len(reads) == 3 and all(r["bytes"] > 0 for r in reads)
    assert bandwidth == pytest.approx(sum(r["bytes"] for r in reads) / sum(r["seconds"] for r in reads))
    for row in payload["rows"]:
        assert row["read_bytes_per_pass"] > 0
        expected = row["tokens_per_pass"] * bandwidth / row["read_bytes_per_pass"]
        assert row["physical_limit_tok_s"] == pytest.approx(expected)
        assert row["of_limit"] == pytest.approx(row["tokens_per_s"] / expected)
    assert [r["budget"] for r in payload["rows"]] == [4, "auto", 0]


def _bench_args(tiny_dirs, prompts, *extra):
    return [
        "bench", "--model", str(tiny_dirs["target"]), "--draft", str(tiny_dirs["draft"]), "--prompts", str(prompts),
        "--budgets", "4", "--temperatures", "0", "--methods", "specexec,ar", "--max-new-tokens", "5", *extra,
    ]


def _log_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _logged_sweep(tiny_dirs, tmp_path, *texts):
    """A prompts file of ``texts``, its log path, and a first logged --json sweep over all of them."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in texts))
    log = tmp_path / "runs.jsonl"
    args = _bench_args(tiny_dirs, prompts, "--n", str(len(texts)), "--log", str(log), "--json")
    return prompts, log, args, runner.invoke(app, args)


def test_bench_log_resumes_and_renders_only_complete_prompts(tiny_dirs, tmp_path):
    _, log, args, first = _logged_sweep(tiny_dirs, tmp_path, "the sea", "blue moon", "red sky")
    assert first.exit_code == 0, first.stderr
    records = _log_lines(log)
    assert records[0]["kind"] == "setup"
    runs = [r for r in records if r["kind"] == "run"]
    assert [(r["prompt"], r["method"]) for r in runs] == [
        (0, "specexec"), (0, "ar"), (1, "specexec"), (1, "ar"), (2, "specexec"), (2, "ar"),
    ]
    # Cut the sweep short after prompt 1's first run (and a half-written line), then resume.
    log.write_text("\n".join(json.dumps(r) for r in records[:4]) + '\n{"kind": "ru')
    resumed = runner.invoke(app, args)
    assert resumed.exit_code == 0, resumed.stderr
    assert "1 prompt(s) already measured" in resumed.stderr
    assert "benchmarking: 2 prompt(s) x 2 configuration(s) = 4 runs" in resumed.stderr
    rerun = [(r["prompt"], r["method"]) for r in _log_lines(log)[4:] if r.get("kind") == "run"]
    assert rerun == [(1, "specexec"), (1, "ar"), (2, "specexec"), (2, "ar")]
    payload = json.loads(resumed.stdout)
    assert payload["setup"]["prompts"] == 3
    assert all(row["prompts"] == 3 for row in payload["rows"])
    # The uninterrupted first invocation reported all three prompts as well.
    assert json.loads(first.stdout)["rows"][0]["prompts"] == 3


def test_bench_from_log_renders_without_loading_a_model(tiny_dirs, tmp_path):
    _, log, _, ran = _logged_sweep(tiny_dirs, tmp_path, "the sea", "blue moon")
    assert ran.exit_code == 0, ran.stderr
    # Drop prompt 1's AR run: only prompt 0 has every configuration.
    records = _log_lines(log)
    log.write_text("".join(json.dumps(r) + "\n" for r in records if not (r.get("prompt") == 1 and r.get("method") == "ar")))
    rendered = runner.invoke(app, ["bench", "--from-log", str(log), "--json"])
    assert rendered.exit_code == 0, rendered.stderr
    payload = json.loads(rendered.stdout)
    assert payload["setup"]["prompts"] == 1
    expected = [r for r in records if r.get("prompt") == 0 and r.get("method") == "specexec"][0]["stats"]
    row = payload["rows"][0]
    assert row["prompts"] == 1 and row["new_tokens"] == expected["new_tokens"]
    assert row["target_passes"] == expected["target_passes"]


def test_bench_log_of_another_benchmark_is_refused_untouched(tiny_dirs, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "the sea"}\n')
    log = tmp_path / "runs.jsonl"
    assert runner.invoke(app, _bench_args(tiny_dirs, prompts, "--n", "1", "--log", str(log))).exit_code == 0
    before = log.read_text()
    other = runner.invoke(app, _bench_args(tiny_dirs, prompts, "--n", "1", "--log", str(log), "--seed", "7"))
    assert other.exit_code != 0
    assert "written by a different benchmark (seed: logged 0, now 7)" in other.stderr and "Traceback" not in other.stderr
    assert log.read_text() == before
    budgets = runner.invoke(app, [*_bench_args(tiny_dirs, prompts, "--n", "1", "--log", str(log)), "--budgets", "4,8"])
    assert "(configurations: logged 2, now 3 (methods, budgets or temperatures))" in budgets.stderr
    assert log.read_text() == before


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("", "no bench setup line"),
        ('{"kind": "run"}\n{"kind": "setup"}\n', "line 1: not a specchat bench log record"),
        ('{"kind": "setup", "setup": {}, "configurations": []}\n{"kind": "run", "stats": null}\n{}\n', "line 2"),
        (None, "cannot read bench log"),
    ],
)
def test_bench_from_log_bad_files(tmp_path, content, fragment):
    log = tmp_path / "runs.jsonl"
    if content is not None:
        log.write_text(content)
    result = runner.invoke(app, ["bench", "--from-log", str(log)])
    assert result.exit_code != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error:") and fragment in result.stderr


def test_bench_plot_draws_a_png(tiny_dirs, tmp_path):
    pytest.importorskip("matplotlib")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "the sea"}\n')
    image = tmp_path / "bench.png"
    result = runner.invoke(app, _bench_args(tiny_dirs, prompts, "--n", "1", "--budgets", "2,4,auto", "--plot", str(image)))
    assert result.exit_code == 0, result.stderr
    assert image.read_bytes().startswith(b"\x89PNG") and f"plot written to {image}" in result.stderr


def test_bench_plot_with_an_unknown_image_type_fails_before_running(tiny_dirs, tmp_path):
    pytest.importorskip("matplotlib")
    result = runner.invoke(app, _bench_args(tiny_dirs, tmp_path / "missing.jsonl", "--plot", str(tmp_path / "x.gif")))
    assert result.exit_code != 0 and "unknown image type '.gif'" in result.stderr


@pytest.mark.parametrize("width, calibrates", [(None, True), ("8", False)])
def test_a_fixed_budget_sweep_calibrates_for_the_auto_draft_width_only(tiny_dirs, tmp_path, width, calibrates):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "the sea"}\n')
    extra = ["--draft-batch", width] if width else []
    result = runner.invoke(app, [*_bench_args(tiny_dirs, prompts, "--n", "1", "--json"), *extra])
    assert result.exit_code == 0, result.stderr
    assert ("measuring pass times" in result.stderr) == calibrates  # the same step costs for every run of the sweep


@pytest.mark.parametrize("full", [True, False])
def test_bench_reports_tree_nodes_per_pass_and_logs_full_growth(tiny_dirs, tmp_path, full):
    log = tmp_path / "b.jsonl"
    result = runner.invoke(app, [
        "bench", "--model", str(tiny_dirs["target"]), "--draft", str(tiny_dirs["draft"]), "--n", "2", "--budgets", "8,24",
        "--temperatures", "0", "--methods", "specexec,ar", "--max-new-tokens", "12", "--json", "--log", str(log),
        *(["--full-growth"] if full else []),
    ])
    assert result.exit_code == 0, result.stderr
    nodes = {(r["method"], r["budget"]): r["tree_nodes_per_pass"] for r in json.loads(result.stdout)["rows"]}
    # The root's first expansion already offers K children: every tree has K nodes, stop or no stop.
    assert nodes == {("specexec", 8): 8, ("specexec", 24): 24, ("ar", 0): None}
    setup = json.loads(log.read_text().splitlines()[0])["setup"]
    assert setup.get("full_growth", False) is full  # so a log resumes only with the same setting


@pytest.mark.parametrize("full", [True, False])
def test_full_growth_turns_the_adaptive_stop_off(full):
    from specchat.bench.sweep import BenchConfig, run_bench
    from specchat.engine.config import GenerationConfig
    from specchat.engine.events import DoneEvent, GenerationStats

    seen = []

    class Engine:
        def reset(self):
            pass

        def generate(self, ids, config):
            seen.append((config.method, config.adaptive))
            yield DoneEvent("", (1,), GenerationStats(config.method, config.budget, 1, 1, 1, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0, 0, "length"))

    class Pipeline:
        engine = Engine()

        def encode_chat(self, messages):
            return [1, 2]

    bench = BenchConfig(("a",), ("specexec", "ar"), (8,), (0.0,), 1.0, 4, 0, full_growth=full)
    run_bench(Pipeline(), bench, GenerationConfig(), on_run=lambda record: None)
    assert seen == [("specexec", not full), ("ar", not full)]


def test_bench_logs_spell_the_auto_budget_minus_one_and_read_it_back_as_auto():
    """Logs written before and after auto became None in memory render alike: -1 on disk is auto."""
    from pathlib import Path

    from specchat.bench.log import read_log

    log = read_log(Path(__file__).parents[1] / "benchmarks" / "results" / "ram_bf16_n10_t0.jsonl")
    assert ("specexec", None, 0.0) in log.configurations
    rendered = runner.invoke(app, ["bench", "--from-log", str(Path(__file__).parents[1] / "benchmarks" / "results" / "ram_bf16_n10_t0.jsonl"), "--json"])
    assert rendered.exit_code == 0, rendered.stderr
    assert [row["budget"] for row in json.loads(rendered.stdout)["rows"]] == [16, "auto", 0]
