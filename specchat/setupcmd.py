"""`specchat setup`: fetch the model and its draft, build the layer store, write the config."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
import sys
import tomllib
from pathlib import Path

import psutil

from .config import RunConfig
from .errors import ConfigError, ModelNotFound, ResourceError
from .oneshot import stderr_progress
from .paths import cache_dir, config_file
from .pipeline import compute_dtype_for, gpu_plan, resident_bytes, resolve_device, resolve_quant, store_dtype_for, stored_dtype
from .registry import ModelEntry, load_registry
from .sources import HUB_FILE_PATTERNS, ModelRef, materialize, parse_model_spec
from .store import build_store, store_dir_for
from .offload import plan_offload


def download(ref: ModelRef, progress) -> Path:
    """Fetch a hub model into the Hugging Face cache (resumable); weights as safetensors only."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    needed = ref.entry.bytes_at(16) if ref.entry else 0
    free = shutil.disk_usage(Path.home()).free
    if needed and needed * 1.05 > free:
        raise ResourceError(
            f"not enough disk to download {ref.hub_id}: {needed / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free",
            "free some space first",
        )
    progress(f"downloading {ref.hub_id} (resumes where it stopped)")
    try:
        path = snapshot_download(ref.hub_id, allow_patterns=list(HUB_FILE_PATTERNS))
    except (HfHubHTTPError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFound(
            f"cannot download {ref.hub_id}: {reason}", "check the name and your network, then run setup again (it resumes)"
        ) from exc
    return Path(path)


def _materialize_or_download(ref: ModelRef, progress) -> Path:
    try:
        return materialize(ref, progress)
    except ModelNotFound:
        if ref.hub_id is None:
            raise
        download(ref, progress)
        return materialize(ref, progress)


SETUP_KEYS = ("model", "draft", "offload", "quant", "ram_budget", "store", "device", "dtype")  # what setup decides


def write_config(path: Path, values: dict[str, str], drop: tuple[str, ...] = ()) -> None:
    """Update keys in the TOML config, remove those in ``drop``, keep the others; atomic replace."""
    current = {}
    if path.is_file():
        try:
            current = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}", "fix or delete it") from exc
    for key in drop:
        current.pop(key, None)
    current.update(values)
    lines = []
    for key, value in current.items():
        if isinstance(value, str):
            lines.append(f"{key} = {json.dumps(value)}")  # a JSON string is a valid TOML basic string
        elif isinstance(value, bool):
            lines.append(f"{key} = {str(value).lower()}")
        else:
            lines.append(f"{key} = {value}")
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".tmp")
    temp.write_text("\n".join(lines) + "\n")
    temp.replace(path)


def run_setup(model: str, settings: RunConfig, yes: bool) -> None:
    progress = stderr_progress
    registry = load_registry()
    ref = parse_model_spec(model, registry)
    interactive = sys.stdin.isatty() and not yes
    if interactive and ref.kind in ("registry", "hub") and ref.entry and ref.entry.hub:
        try:
            answer = input(f"set up {ref.display} ({ref.entry.bytes_at(16) / 1e9:.1f} GB at 16-bit)? [Y/n] ")
        except EOFError:  # Ctrl-D: no answer is no
            answer = "n"
        if answer.strip().lower() in ("n", "no"):
            progress("setup cancelled")
            return
    target_dir = _materialize_or_download(ref, progress)
    progress(f"target {ref.display}: {target_dir}")
    draft_name, draft_dir = None, None
    candidates: list[str] = [settings.draft] if settings.draft not in ("auto", "none") else (list(ref.entry.drafts) if ref.entry else [])
    if settings.draft != "none":
        for candidate in candidates:
            draft_ref = parse_model_spec(candidate, registry)
            draft_dir = _materialize_or_download(draft_ref, progress)
            draft_name = draft_ref.display
            progress(f"draft {draft_name}: ready")
            break
    from .loading import check_architecture

    layers = int(check_architecture(target_dir).num_hidden_layers)
    device = resolve_device(settings.device)
    dtype = compute_dtype_for(device, settings.dtype)
    model_bytes = resident_bytes(target_dir, dtype)
    if device.type == "cuda":  # the draft goes on the GPU first; the target's layers fill what it leaves
        draft_bytes = resident_bytes(draft_dir, dtype) if draft_dir is not None else 0
        plan = gpu_plan(settings, target_dir, draft_bytes, device)
    else:
        available = psutil.virtual_memory().available
        plan = plan_offload(settings.offload, layers, model_bytes // layers, model_bytes, available, settings.ram_budget)
    progress(plan.reason)
    quant = resolve_quant(settings.quant, plan.mode)
    if plan.mode in ("ram", "ssd") or quant == "4bit":  # ("ram" only on a GPU: layers copied from pinned RAM)
        store_dtype = store_dtype_for(quant, target_dir, dtype)
        path = store_dir_for(settings.store or cache_dir() / "stores", target_dir, store_dtype)
        build_store(
            target_dir, path, store_dtype,
            lambda done, total: progress(f"layer store: {done}/{total}") if done == total or done % 8 == 0 else None,
            dense_dtype=stored_dtype(target_dir),
        )
        progress(f"layer store ready: {path}")
    values = {
        "model": ref.spec if ref.kind != "registry" else ref.entry.name,
        # an auto-chosen draft stays "auto": run re-pairs (and re-checks the tokenizer) for any --model
        "draft": "none" if draft_name is None else settings.draft if settings.draft != "auto" else "auto",
        "offload": plan.mode,
        "quant": quant,
    }
    if settings.ram_budget is not None and plan.mode == "ssd":
        values["ram_budget"] = settings.ram_budget  # the placement the calibration and later runs share
    if settings.store is not None:
        values["store"] = str(settings.store)
    if settings.device != "auto":
        values["device"] = settings.device
    if settings.dtype != "auto":
        values["dtype"] = settings.dtype
    write_config(config_file(), values, drop=SETUP_KEYS)
    progress(f"wrote {config_file()}: " + ", ".join(f"{k} = {v}" for k, v in values.items()))
    if draft_name is not None:
        calibrate_setup(replace(settings, model=values["model"], draft=draft_name, offload=plan.mode, quant=quant), progress)


def calibrate_setup(settings: RunConfig, progress) -> None:
    """Load the pair as `run` will, measure the cost model for --budget auto, and say what it would choose."""
    from .costmodel import CostModelTuner
    from .pipeline import ensure_calibration, load_pipeline

    pipeline = load_pipeline(replace(settings, budget=1), progress)  # a fixed budget: no calibration inside
    calibration = ensure_calibration(pipeline, replace(settings, budget=None), progress, force=True)
    table = ", ".join(f"{k} tokens {s:.2f}s" for k, s in sorted(calibration.target_s.items()))
    progress(f"target pass: {table}")
    tuner = CostModelTuner(calibration, "specexec", settings.max_depth)
    progress(f"--budget auto starts at {tuner.explain()}")
