"""The registry as `specchat models` shows it: sizes, local presence, and fit on this machine."""

from __future__ import annotations

import importlib.metadata
import shutil

import psutil

from specchat.app.hardware import fit, gpu_info
from specchat.common.paths import cache_dir
from specchat.model.selfdraft import DEFAULT_SELF_KIND, SELF_BYTES_PER_WEIGHT
from specchat.sources.registry import ModelEntry, load_registry
from specchat.weights.precision import cpu_auto_dtype


def is_present(entry: ModelEntry) -> bool:
    """Weights available without a download: part packages installed, or the hub snapshot cached."""
    if entry.parts is not None:
        try:
            return all(
                importlib.metadata.version(entry.parts.distribution(n)) == entry.parts.version
                for n in range(1, entry.parts.count + 1)
            )
        except importlib.metadata.PackageNotFoundError:
            return False
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(entry.hub, "config.json"), str)


def registry_rows() -> list[dict]:
    """`specchat models`: every registered target with its fit on this machine as it is now."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    facts = {
        "ram_available": psutil.virtual_memory().available,
        "gpus": gpu_info(),
        "disk_free": shutil.disk_usage(root).free,
        "cpu": {"compute_dtype": cpu_auto_dtype()},
    }
    return model_rows(load_registry(), facts)


def model_rows(registry: dict[str, ModelEntry], facts: dict) -> list[dict]:
    rows = []
    for entry in registry.values():
        if entry.role not in ("target", "both"):
            continue
        rows.append(
            {
                "name": entry.name,
                "hub": entry.hub,
                "params_b": entry.params_b,
                "bytes_16bit": entry.bytes_at(16),
                "bytes_4bit": entry.bytes_at(4),
                "drafts": [
                    {"name": d, "params_b": registry[d].params_b, "present": is_present(registry[d])} for d in entry.drafts
                ],
                # --draft self: the target's own layers in low bits (an upper bound: embeddings and head are shared)
                "self_draft": {"name": f"self:{DEFAULT_SELF_KIND}", "bytes": int(entry.bytes_at(8) * SELF_BYTES_PER_WEIGHT[DEFAULT_SELF_KIND])},
                "present": is_present(entry),
                "fits": fit(entry, facts),
            }
        )
    return rows
