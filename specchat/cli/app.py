"""The `specchat` command line: parse options, build one frozen config, dispatch."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from specchat.cli.boundary import error_boundary
from specchat import build_config, config_file

app = typer.Typer(
    name="specchat",
    help="Chat with a model larger than your GPU or RAM, fast: SpecExec speculative decoding over a streamed target.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="Config file (TOML). Default: $XDG_CONFIG_HOME/specchat/config.toml.")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", help="Target: registry name, hub id, directory or .gguf. Default: configured model, else demo.")]
DraftOpt = Annotated[Optional[str], typer.Option("--draft", help="Draft: registry name, hub id, path, 'auto' or 'none'.")]
QuantOpt = Annotated[Optional[str], typer.Option("--quant", help="Target precision: 16bit, 4bit (NF4, streams 3.5x fewer bytes) or auto.")]
DraftQuantOpt = Annotated[Optional[str], typer.Option("--draft-quant", help="Draft weights: int8 (dynamic, fast on CPU) or none.")]
OffloadOpt = Annotated[Optional[str], typer.Option("--offload", help="Where the target's layers live: auto, none (resident), ram (pinned RAM, copied to the GPU each pass; resident on a CPU) or ssd (streamed from the layer store).")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="Compute device: auto (a CUDA GPU if torch sees one), cpu or cuda.")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="What the target computes in: auto (bfloat16 on a GPU, or on a CPU with bf16 matrix instructions; else float32), float32, bfloat16 or float16.")]
RamBudgetOpt = Annotated[Optional[str], typer.Option("--ram-budget", help="RAM the target's resident layers may use, e.g. 512MB, 4GB.")]
StoreOpt = Annotated[Optional[Path], typer.Option("--store", help="Layer store directory.")]
MethodOpt = Annotated[Optional[str], typer.Option("--method", help="specexec, specinfer or ar (plain decoding).")]
DraftBatchOpt = Annotated[Optional[str], typer.Option("--draft-batch", help="Nodes per draft step, or auto (each step picks its width from the calibrated step costs; the default).")]
BudgetOpt = Annotated[Optional[str], typer.Option("--budget", help="Tree tokens the target verifies per pass, or auto (tuned from measured speed; the default).")]
TemperatureOpt = Annotated[Optional[float], typer.Option("--temperature", help="0 = greedy.")]
TopPOpt = Annotated[Optional[float], typer.Option("--top-p", help="Nucleus mass in (0, 1].")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Seed for reproducible sampling.")]
MaxNewOpt = Annotated[Optional[int], typer.Option("--max-new-tokens", help="Stop after this many new tokens.")]
SystemOpt = Annotated[Optional[str], typer.Option("--system", help="System prompt.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]


SETTING_OPTIONS = {
    "model": ModelOpt, "draft": DraftOpt, "draft_quant": DraftQuantOpt, "quant": QuantOpt, "offload": OffloadOpt,
    "device": DeviceOpt, "dtype": DtypeOpt, "ram_budget": RamBudgetOpt, "store": StoreOpt, "method": MethodOpt,
    "budget": BudgetOpt, "draft_batch": DraftBatchOpt, "temperature": TemperatureOpt, "top_p": TopPOpt, "seed": SeedOpt,
    "max_new_tokens": MaxNewOpt, "system": SystemOpt,
}
RUN_SETTINGS = tuple(SETTING_OPTIONS)  # what `run` and `chat` take
PLACEMENT_SETTINGS = ("draft", "quant", "offload", "device", "dtype", "ram_budget", "store")
SETUP_SETTINGS = PLACEMENT_SETTINGS  # `setup` takes its model as an argument
BENCH_SETTINGS = ("model", "draft_quant", *PLACEMENT_SETTINGS, "draft_batch")  # the sweep sets the rest


def _with_setting_options(*names: str):
    """Give a command the run-setting options ``names`` (one definition for every command that
    takes them); the command receives them as keyword arguments, None where not given."""

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
        extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=SETTING_OPTIONS[n]) for n in names]
        command.__signature__ = signature.replace(parameters=own + extra)
        return command

    return decorate


def _version(value: bool) -> None:
    if value:
        from specchat import __version__

        print(f"specchat {__version__}")
        raise typer.Exit()


@app.callback()
def specchat(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
) -> None:
    """Chat with a model larger than your GPU or RAM, fast."""


@app.command()
@_with_setting_options(*RUN_SETTINGS)
def run(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt; omitted or '-' reads stdin.")] = None,
    config: ConfigOpt = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object with text, tokens and stats.")] = False,
    debug: DebugOpt = False,
    **flags,
) -> None:
    """Answer one prompt and exit. Reads stdin when PROMPT is omitted or '-'."""
    from specchat.cli.run import read_prompt, run_oneshot, stderr_progress

    with error_boundary(debug):
        settings = build_config(flags, config, config_file())
        text = read_prompt(prompt, sys.stdin)
        run_oneshot(settings, text, json_output, sys.stdout, sys.stderr, stderr_progress)


@app.command()
@_with_setting_options(*RUN_SETTINGS)
def chat(
    config: ConfigOpt = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue a session saved with /save.")] = None,
    debug: DebugOpt = False,
    **flags,
) -> None:
    """Hold a conversation. Reads one message per line when stdin is not a terminal."""
    from specchat.cli.chat import run_chat

    with error_boundary(debug):
        given = frozenset(name for name, value in flags.items() if value is not None)
        run_chat(build_config(flags, config, config_file()), resume, given)


@app.command()
@_with_setting_options(*RUN_SETTINGS)
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on: 127.0.0.1 (this machine only) or 0.0.0.0 (every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on; 0 takes any free one.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="SPECCHAT_API_KEY", help="Answer only requests with Authorization: Bearer <key> (or set SPECCHAT_API_KEY).")] = None,
    queue_size: Annotated[int, typer.Option("--queue-size", help="Requests that may wait while one is answered; more get HTTP 429.")] = 8,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
    **flags,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions), one request at a time."""
    from specchat.cli.serve import serve_command
    from specchat.server.config import ServeConfig

    with error_boundary(debug):
        listen = ServeConfig(host=host, port=port, api_key=api_key, queue_size=queue_size)
        serve_command(build_config(flags, config, config_file()), listen)


@app.command()
def detect(
    store: StoreOpt = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the facts and advice as JSON.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Report CPU, RAM, GPUs and disk (measured read bandwidth), and what to run here."""
    import json

    from specchat.app.hardware import detect as detect_hardware, recommend
    from specchat import cache_dir
    from specchat.cli.views import detect_report

    from specchat.app.calibration import calibrated_budgets

    with error_boundary(debug):
        facts = detect_hardware(store or cache_dir() / "stores")
        advice = recommend(facts)
        calibrated = calibrated_budgets()
        if json_output:
            print(json.dumps(facts | {"recommendation": advice, "calibrated_budget": calibrated}, indent=1))
        else:
            detect_report(facts, advice, sys.stdout, calibrated)


@app.command()
def models(
    json_output: Annotated[bool, typer.Option("--json", help="Print the registry as JSON.")] = False,
    debug: DebugOpt = False,
) -> None:
    """List registered targets with their drafts, sizes, presence and fit on this machine."""
    import json

    from specchat.app.catalog import registry_rows
    from specchat.cli.views import models_table

    with error_boundary(debug):
        rows = registry_rows()
        if json_output:
            print(json.dumps(rows, indent=1))
        else:
            models_table(rows, sys.stdout)


@app.command()
@_with_setting_options(*SETUP_SETTINGS)
def setup(
    model: Annotated[str, typer.Argument(help="Registry name, hub id, directory or .gguf.")] = "demo",
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before downloading.")] = False,
    debug: DebugOpt = False,
    **flags,
) -> None:
    """Fetch a model and its draft, build the layer store if it will stream, and write the config."""
    from specchat.cli.setup import setup_command

    with error_boundary(debug):
        # From defaults and flags only: a previous setup's model, draft or placement must not leak into this one.
        settings = build_config(flags, None, config_file(), use_file=False)
        setup_command(model, settings, yes)


def _budget(text: str) -> int | None:
    """One --budgets entry: a tree size, or None for auto."""
    if text.strip() == "auto":
        return None
    value = int(text)
    if value < 1:
        raise ValueError(f"a budget must be >= 1 or auto, got {value}")
    return value


def _split(text: str, kind, what: str) -> tuple:
    from specchat import ConfigError

    try:
        return tuple(dict.fromkeys(kind(part) for part in text.split(",") if part.strip()))  # in order, once each
    except ValueError as exc:
        raise ConfigError(f"--{what} must be a comma-separated list, got {text!r} ({exc})") from exc


@app.command()
@_with_setting_options(*BENCH_SETTINGS)
def bench(
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="JSONL prompts (MT-Bench {\"turns\": [...]} or {\"prompt\": ...}). Default: MT-Bench first turns.")] = None,
    n: Annotated[int, typer.Option("--n", help="Number of prompts.")] = 20,
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated methods.")] = "specexec,specinfer,ar",
    budgets: Annotated[str, typer.Option("--budgets", help="Comma-separated tree budgets; 'auto' for the tuner.")] = "16,64,256,auto",
    temperatures: Annotated[str, typer.Option("--temperatures", help="Comma-separated temperatures.")] = "0,0.6",
    top_p: Annotated[float, typer.Option("--top-p", help="Top-p for temperatures above 0.")] = 0.9,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 64,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    config: ConfigOpt = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    calibrate: Annotated[bool, typer.Option("--calibrate", help="Re-measure the cost model behind --budget auto first.")] = False,
    full_growth: Annotated[bool, typer.Option("--full-growth", help="SpecExec: grow each tree until its nodes are the draft's best (no adaptive stop; drafting gets slower): what the stop costs in tokens per pass.")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also draw tokens/pass and tokens/s vs. budget to this .png/.svg/.pdf (needs matplotlib: the plot extra).")] = None,
    log: Annotated[Optional[Path], typer.Option("--log", help="Append every run to this JSONL file; an existing log of the same benchmark is resumed.")] = None,
    from_log: Annotated[Optional[Path], typer.Option("--from-log", help="Run nothing: render the prompts a --log file completed.")] = None,
    debug: DebugOpt = False,
    **flags,
) -> None:
    """Measure tokens per pass and tokens/s of each method and budget on a prompt set."""
    from specchat.cli.bench import BenchOutput, render_log_command, run_bench_command

    output = BenchOutput(as_json=json_output, plot=plot, log=log)
    with error_boundary(debug):
        if from_log is not None:
            render_log_command(from_log, output)
            return
        settings = build_config(flags, config, config_file())
        run_bench_command(
            settings,
            prompts_file=prompts,
            n=n,
            methods=_split(methods, str, "methods"),
            budgets=_split(budgets, _budget, "budgets"),
            temperatures=_split(temperatures, float, "temperatures"),
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            seed=seed,
            output=output,
            calibrate=calibrate,
            full_growth=full_growth,
        )
