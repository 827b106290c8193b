"""Setting a model up once: fetch it and its draft, build the layer store if it will stream,
write the config, and measure the pass costs ``--budget auto`` starts from."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from specchat.app.calibration import calibrate_for_setup
from specchat.app.config import RunConfig
from specchat.app.drafts import int8_draft, self_kind_for
from specchat.app.loader import load_pipeline
from specchat.common.errors import ConfigError, ModelNotFound
from specchat.common.files import atomic_write, check_free_disk
from specchat.common.paths import cache_dir, config_file
from specchat.model.placement import draft_bytes, free_memory, place_target, resolve_device
from specchat.model.target import open_layer_store
from specchat.model.selfdraft import self_draft_bytes, self_draft_kind
from specchat.sources.facts import ModelFacts, read_facts
from specchat.sources.registry import load_registry
from specchat.sources.resolve import HUB_FILE_PATTERNS, ModelRef, Progress, materialize, parse_model_spec
from specchat.weights.precision import resolve_compute_dtype


def download(ref: ModelRef, progress) -> Path:
    """Fetch a hub model into the Hugging Face cache (resumable); weights as safetensors only."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    needed = ref.entry.bytes_at(16) if ref.entry else 0
    if needed:  # the weights and a little for the tokenizer and configs
        check_free_disk(Path.home(), int(needed * 1.05), f"to download {ref.hub_id}", "free some space first")
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
    atomic_write(path, "\n".join(lines) + "\n")


def run_setup(model: str, settings: RunConfig, progress: Progress, confirm: Callable[[str], bool] | None = None) -> None:
    """Set ``model`` up with ``settings``; ``confirm`` (a question -> yes?) is asked before a
    registered hub model is downloaded, None to go ahead without asking."""
    registry = load_registry()
    ref = parse_model_spec(model, registry)
    if confirm is not None and ref.kind in ("registry", "hub") and ref.entry and ref.entry.hub:
        if not confirm(f"set up {ref.display} ({ref.entry.bytes_at(16) / 1e9:.1f} GB at 16-bit)?"):
            progress("setup cancelled")
            return
    target_dir = _materialize_or_download(ref, progress)
    progress(f"target {ref.display}: {target_dir}")
    target_facts = read_facts(target_dir)
    device = resolve_device(settings.device)
    dtype = resolve_compute_dtype(settings.dtype, device)[0]
    draft_name, load_bytes = _fetch_draft(ref, settings, registry, target_facts, device, dtype, progress)
    # the same placement `run` will make beside this draft
    plan = place_target(
        target_facts, settings.offload, settings.quant, settings.ram_budget, dtype, device, free_memory(device), load_bytes
    )
    progress(plan.reason)
    quant = plan.quant
    if plan.store_dtype is not None:
        store = open_layer_store(target_facts, plan, settings.store or cache_dir() / "stores", progress)
        progress(f"layer store ready: {store.path}")
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
        # the draft as run will choose it (auto may take the self draft where the target streams)
        chosen = replace(settings, model=values["model"], draft=values["draft"], offload=plan.mode, quant=quant)
        pipeline = load_pipeline(chosen, progress, calibrate=False)  # measured next, always afresh
        calibrate_for_setup(pipeline, chosen, progress)


def _fetch_draft(
    ref: ModelRef, settings: RunConfig, registry, target: ModelFacts, device: torch.device, dtype: torch.dtype, progress
) -> tuple[str | None, int]:
    """The configured draft, or the target's first registered one, fetched if missing, or for a
    target with none its own layers in low bits on a CPU (as `run` pairs them: :func:`self_kind_for`): (name, bytes beside the target)."""
    if settings.draft == "none":
        return None, 0
    kind = self_draft_kind(settings.draft)
    candidates = [settings.draft] if settings.draft != "auto" else (list(ref.entry.drafts) if ref.entry else [])
    if kind is None and not candidates and device.type == "cpu":
        kind = self_kind_for(settings.quant)
    if kind is not None:
        return f"self:{kind}", self_draft_bytes(target, kind, dtype)  # built (and kept) by the load below
    if not candidates:
        return None, 0
    draft_ref = parse_model_spec(candidates[0], registry)
    facts = read_facts(_materialize_or_download(draft_ref, progress))
    progress(f"draft {draft_ref.display}: ready")
    return draft_ref.display, draft_bytes(facts, int8_draft(settings, device), dtype)
