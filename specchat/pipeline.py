"""From a :class:`RunConfig` to a ready :class:`Engine`: resolve, pre-flight, load, pair, template."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import psutil
import torch

from .calibrate import measure_calibration
from .config import RunConfig
from .costmodel import Calibration, load_calibration, save_calibration
from .engine import Engine
from .errors import CorruptModel, InputError, ModelNotFound, ResourceError, SpecchatError
from .loading import LoadedModel, check_architecture, check_same_tokenizer, load_int8, load_resident, load_tokenizer
from .offload import OffloadPlan, layer_compute_bytes, load_streamed, plan_offload, plan_offload_gpu
from .paths import cache_dir
from .precision import dtype_name, resolve_compute_dtype
from .registry import ModelEntry, load_registry
from .sources import ModelRef, Progress, materialize, parse_model_spec
from .store import build_store, store_dir_for
from .streamer import RING

RAM_HEADROOM = 1.1  # activations, KV cache and allocator slack over the raw weights


def resolve_device(choice: str) -> torch.device:
    """``--device``: auto = the first CUDA GPU torch sees, else the CPU."""
    if choice == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if choice == "cuda":
        raise ResourceError(
            "--device cuda: torch sees no CUDA GPU",
            "install a CUDA build of torch (pip install torch --index-url https://download.pytorch.org/whl/cu128) "
            "or use --device cpu",
        )
    return torch.device("cpu")


def compute_dtype_for(device: torch.device, choice: str = "auto") -> torch.dtype:
    """``--dtype``: bf16 on a GPU that has it (else fp16); on a CPU bf16 where it has bf16 matrix
    instructions, else fp32 (:mod:`specchat.precision`)."""
    return resolve_compute_dtype(choice, device)[0]


@dataclass
class Pipeline:
    engine: Engine
    target: LoadedModel
    draft: LoadedModel | None
    target_name: str
    draft_name: str | None
    draft_reason: str
    offload: OffloadPlan
    device: torch.device = torch.device("cpu")
    config: RunConfig | None = None  # what it was loaded with (the calibration's key)
    compute_dtype: torch.dtype = torch.float32  # the target's (and a 16-bit draft's)

    @property
    def tokenizer(self):
        return self.target.tokenizer

    def ensure_calibration(self, progress: Progress = lambda message: None) -> None:
        """Measure (or load) and save the pass costs ``--budget auto`` needs, if the engine has none."""
        if self.engine.calibration is None and self.engine.draft is not None and self.config is not None:
            ensure_calibration(self, self.config, progress)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` through the model's chat template, ready for the reply."""
        return encode_chat(self.tokenizer, messages)


def encode_chat(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:  # a base model: plain concatenation
        text = "\n\n".join(m["content"] for m in messages)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _safetensors_headers(model_dir: Path) -> list[dict]:
    """The JSON header of each safetensors file: tensor name -> dtype, shape, offsets."""
    headers = []
    for file in sorted(model_dir.glob("*.safetensors")):
        try:
            with open(file, "rb") as handle:
                (header_len,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(header_len))
            header.pop("__metadata__", None)
        except (struct.error, ValueError, AttributeError, OSError, MemoryError, OverflowError) as exc:
            raise CorruptModel(f"{file} is not a readable safetensors file ({exc})", "re-download or re-convert the model") from exc
        headers.append(header)
    return headers


_WIDTHS = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1}


def resident_bytes(model_dir: Path, dtype: torch.dtype, layers: bool | None = None) -> int:
    """Bytes the weights take once loaded in ``dtype``, from the safetensors headers.

    ``layers``: None counts every tensor, True only the decoder layers', False all the others.
    """
    elements = sum(
        (info["data_offsets"][1] - info["data_offsets"][0]) // _WIDTHS.get(info["dtype"], 2)
        for header in _safetensors_headers(model_dir)
        for name, info in header.items()
        if layers is None or (".layers." in name) == layers
    )
    return elements * torch.finfo(dtype).bits // 8


def stored_dtype(model_dir: Path) -> str:
    """The 16-bit dtype the layer store keeps: the model's own, bf16 for a float32 model."""
    dtypes = {info["dtype"] for header in _safetensors_headers(model_dir) for info in header.values()}
    return "float16" if dtypes == {"F16"} else "bfloat16"


def _check_ram(needed: int, what: str) -> None:
    available = psutil.virtual_memory().available
    if needed * RAM_HEADROOM > available:
        raise ResourceError(
            f"not enough RAM to {what}: {needed * RAM_HEADROOM / 1e9:.1f} GB needed, {available / 1e9:.1f} GB available",
            "use --offload ssd with a smaller --ram-budget, close other programs, or pick a smaller model",
        )


def _choose_draft(
    config: RunConfig, target_ref: ModelRef, target_dir: Path, registry: dict[str, ModelEntry], progress: Progress
) -> tuple[ModelRef | None, Path | None, str]:
    """(draft ref, its directory, one-line reason); the draft's tokenizer is checked against the target's."""
    if config.method == "ar" or config.draft == "none":
        return None, None, "no draft: plain autoregressive decoding"
    if config.draft != "auto":
        ref = parse_model_spec(config.draft, registry)
        draft_dir = materialize(ref, progress)
        check_same_tokenizer(load_tokenizer(target_dir), load_tokenizer(draft_dir), ref.display)
        return ref, draft_dir, f"draft {ref.display}: as configured (--draft, SPECCHAT_DRAFT or the config file); same tokenizer as the target"
    return _auto_draft(config, target_ref, target_dir, registry, progress)


def _auto_draft(
    config: RunConfig, target_ref: ModelRef, target_dir: Path, registry: dict[str, ModelEntry], progress: Progress
) -> tuple[ModelRef, Path, str]:
    """The first draft models.toml lists for the target that is here, shares its tokenizer and fits.

    Tokenizers are compared on the real files (vocabulary and special tokens),
    not by family name; "fits" is the RAM left once the target's own share is
    set aside (:func:`fast_memory_left`).
    """
    candidates = list(target_ref.entry.drafts) if target_ref.entry else []
    if not candidates:
        raise InputError(
            f"no registered draft pairs with {target_ref.display}",
            "name one with --draft, or use --draft none for plain decoding",
        )
    target_tokenizer = load_tokenizer(target_dir)
    device = resolve_device(config.device)
    dtype = compute_dtype_for(device, config.dtype)
    room = fast_memory_left(target_dir, config.offload, config.ram_budget, device, dtype)
    skipped = []
    for name in candidates:
        ref = parse_model_spec(name, registry)
        try:
            draft_dir = materialize(ref, progress)
            check_same_tokenizer(target_tokenizer, load_tokenizer(draft_dir), name)
        except SpecchatError as exc:  # absent, corrupt, or another tokenizer
            skipped.append(f"{name}: {exc.what}")
            continue
        needed = int(draft_load_bytes(draft_dir, config, device, dtype) * RAM_HEADROOM)
        if needed > room:
            skipped.append(f"{name}: needs {needed / 1e9:.1f} GB, {max(room, 0) / 1e9:.1f} GB left beside the target")
            continue
        reason = (
            f"draft {name}: the first registered draft of {target_ref.display} that is here, shares its tokenizer "
            f"and fits ({needed / 1e9:.1f} of {room / 1e9:.1f} GB)"
        )
        return ref, draft_dir, reason + (f"; skipped {'; '.join(skipped)}" if skipped else "")
    raise ModelNotFound(
        f"no registered draft of {target_ref.display} can be used: {'; '.join(skipped)}",
        f"`specchat setup {target_ref.spec}` fetches missing drafts; or lower --ram-budget, name a draft with --draft, "
        "or use --draft none",
    )


def draft_load_bytes(draft_dir: Path, config: RunConfig, device: torch.device, dtype: torch.dtype) -> int:
    """The draft's loading peak: on a CPU an int8 draft from a 16-bit checkpoint peaks at about twice
    the 16-bit weights, i.e. its float32 size (benchmarks/draft_load_peak.py); else its size in ``dtype``."""
    int8 = config.draft_quant == "int8" and device.type == "cpu"
    return resident_bytes(draft_dir, torch.float32 if int8 else dtype)


def fast_memory_left(
    target_dir: Path,
    offload: str = "auto",
    ram_budget: int | None = None,
    device: torch.device = torch.device("cpu"),
    dtype: torch.dtype = torch.float32,
) -> int:
    """Memory of the compute device available beside the target.

    CPU: RAM minus all of the target when resident (``none``/``ram``), else minus its non-layer
    weights, the layers ``--ram-budget`` keeps, and a ring of two streamed layers.
    GPU: free VRAM minus the target's least share (non-layer weights, two slots of a layer and
    its file -- 4 layers' worth -- and 1 GiB of headroom); the draft goes first, the target's
    layers fill what it leaves.
    """
    if device.type == "cuda":
        layers = int(check_architecture(target_dir).num_hidden_layers)
        per_layer = resident_bytes(target_dir, dtype, layers=True) // max(layers, 1)
        least = resident_bytes(target_dir, dtype, layers=False) + 4 * per_layer + (1 << 30)
        return torch.cuda.mem_get_info(device)[0] - least
    if offload in ("none", "ram"):
        floor = resident_bytes(target_dir, dtype)
    else:
        layers = int(check_architecture(target_dir).num_hidden_layers)
        per_layer = resident_bytes(target_dir, dtype, layers=True) // max(layers, 1)
        kept = min(ram_budget or 0, layers * per_layer)
        floor = resident_bytes(target_dir, dtype, layers=False) + kept + 2 * per_layer
    return psutil.virtual_memory().available - int(floor * RAM_HEADROOM)


def store_dtype_for(quant: str, target_dir: Path, compute_dtype: torch.dtype) -> str:
    """The layer store's dtype for ``--quant``: NF4 for 4bit; else the compute dtype when that is
    16-bit (a streamed layer is then used as read, with no conversion), or the model's own 16 bits."""
    if quant == "4bit":
        return "nf4"
    return dtype_name(compute_dtype) if compute_dtype in (torch.float16, torch.bfloat16) else stored_dtype(target_dir)


def resolve_quant(quant: str, offload_mode: str) -> str:
    """``--quant auto``: 16-bit, the target's own outputs (4-bit NF4 is faster to stream but a different model)."""
    return "16bit" if quant == "auto" else quant


def _load_target(
    config: RunConfig, target_dir: Path, draft_bytes: int, dtype: torch.dtype, progress: Progress
) -> tuple[LoadedModel, OffloadPlan]:
    model_bytes = resident_bytes(target_dir, dtype)
    hf_config = check_architecture(target_dir)
    layers = int(hf_config.num_hidden_layers)
    mode = "none" if config.offload == "ram" else config.offload  # on a CPU, RAM offload is residency
    available = max(psutil.virtual_memory().available - draft_bytes, 0)
    plan = plan_offload(mode, layers, model_bytes // layers, model_bytes, available, config.ram_budget)
    quant = resolve_quant(config.quant, plan.mode)
    if plan.mode == "none" and quant == "16bit":
        _check_ram(model_bytes + draft_bytes, "hold the models")
        return load_resident(target_dir, dtype), plan
    store_dtype = store_dtype_for(quant, target_dir, dtype)
    store_path = store_dir_for(config.store or cache_dir() / "stores", target_dir, store_dtype)
    store = build_store(target_dir, store_path, store_dtype, _store_progress(progress), dense_dtype=stored_dtype(target_dir))
    per_layer = layer_compute_bytes(store, dtype)
    if plan.mode == "none":  # 4-bit weights, every layer dequantised once and kept
        plan = OffloadPlan("none", layers, f"{plan.reason}; 4-bit NF4 weights from {store_path.name}")
    else:
        plan = plan_offload("ssd", layers, per_layer, model_bytes, available, config.ram_budget)
        plan = OffloadPlan(plan.mode, plan.resident_layers, f"{plan.reason} ({'4-bit NF4' if store_dtype == 'nf4' else store_dtype})")
    # the ring: RING read buffers and RING layer slots (or, with no conversion, twice as many buffers that are the slots)
    streamed_ring = RING * (store.layer_bytes + per_layer) if plan.resident_layers < layers else 0
    _check_ram(plan.resident_layers * per_layer + streamed_ring + (model_bytes - layers * per_layer) + draft_bytes, "stream the target")
    lm = load_streamed(store, dtype, resident_layers=plan.resident_layers)
    return LoadedModel(lm, load_tokenizer(target_dir), target_dir), plan


def gpu_plan(
    config: RunConfig, target_dir: Path, draft_bytes: int, device: torch.device, stored_layer_bytes: int | None = None
) -> OffloadPlan:
    """Where the target's layers go on ``device`` (:func:`plan_offload_gpu`) beside a draft of
    ``draft_bytes``; the layer-file size is estimated until the store exists."""
    dtype = compute_dtype_for(device, config.dtype)
    layers = int(check_architecture(target_dir).num_hidden_layers)
    four_bit = resolve_quant(config.quant, config.offload) == "4bit"
    layer_bytes = resident_bytes(target_dir, dtype, layers=True) // max(layers, 1)
    if stored_layer_bytes is None:  # a 16-bit store holds the layer as is; NF4 keeps 4.5 of its 16 bits
        stored_layer_bytes = layer_bytes * 9 // 32 if four_bit else layer_bytes
    return plan_offload_gpu(
        config.offload,
        layers,
        layer_bytes,
        stored_layer_bytes,
        resident_bytes(target_dir, dtype, layers=False),
        torch.cuda.mem_get_info(device)[0] - draft_bytes,
        psutil.virtual_memory().available,
        config.ram_budget,
        keep_files=four_bit,
    )


def _load_target_gpu(
    config: RunConfig, target_dir: Path, draft_bytes: int, device: torch.device, progress: Progress
) -> tuple[LoadedModel, OffloadPlan]:
    """The target on a GPU: resident when it fits, else its layers copied in every pass from
    pinned host RAM or the store (:mod:`specchat.devicestream`); a 4-bit target keeps its
    packed layer files on the GPU and dequantises them there."""
    dtype = compute_dtype_for(device, config.dtype)
    layers = int(check_architecture(target_dir).num_hidden_layers)
    four_bit = resolve_quant(config.quant, config.offload) == "4bit"
    layer_bytes = resident_bytes(target_dir, dtype, layers=True) // layers
    other_bytes = resident_bytes(target_dir, dtype, layers=False)
    vram_free = torch.cuda.mem_get_info(device)[0] - draft_bytes
    plan = gpu_plan(config, target_dir, draft_bytes, device)
    if plan.mode == "none" and not four_bit:
        _check_vram(other_bytes + layers * layer_bytes, vram_free, device, "hold the target")
        return load_resident(target_dir, dtype, str(device)), plan
    store_dtype = store_dtype_for(resolve_quant(config.quant, plan.mode), target_dir, dtype)
    store_path = store_dir_for(config.store or cache_dir() / "stores", target_dir, store_dtype)
    store = build_store(target_dir, store_path, store_dtype, _store_progress(progress), dense_dtype=stored_dtype(target_dir))
    # Again with the layer files' real size (same --offload, so an auto choice keeps its reason).
    plan = gpu_plan(config, target_dir, draft_bytes, device, store.layer_bytes)
    if four_bit:
        plan = OffloadPlan(plan.mode, plan.resident_layers, f"{plan.reason} (4-bit NF4 layer files)", plan.host_layers)
    kept = plan.resident_layers * (store.layer_bytes if four_bit else layer_bytes)
    _check_vram(other_bytes + kept + 2 * (layer_bytes + store.layer_bytes), vram_free, device, "stream the target")
    staging = 2 * store.layer_bytes if plan.resident_layers + plan.host_layers < layers else 0
    _check_ram(plan.host_layers * store.layer_bytes + staging, "hold the target's layers in pinned RAM")
    lm = load_streamed(
        store, dtype, resident_layers=plan.resident_layers, device=device, host_layers=plan.host_layers,
        copy_to_device=True, keep_files=four_bit,
    )
    return LoadedModel(lm, load_tokenizer(target_dir), target_dir), plan


def _check_vram(needed: int, free: int, device: torch.device, what: str) -> None:
    if needed > free:
        raise ResourceError(
            f"not enough GPU memory to {what} on {device}: {needed / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free",
            "use --offload ram or ssd, --quant 4bit, a smaller draft, or close other GPU programs",
        )


def _store_progress(progress: Progress):
    def report(done: int, total: int) -> None:
        if done == 1 or done == total or done % 8 == 0:
            progress(f"building the layer store: {done}/{total} layers")

    return report


def load_pipeline(config: RunConfig, progress: Progress) -> Pipeline:
    registry = load_registry()
    target_ref = parse_model_spec(config.model, registry)
    target_dir = materialize(target_ref, progress)
    # refuses a mismatched draft before loading gigabytes
    draft_ref, draft_dir, reason = _choose_draft(config, target_ref, target_dir, registry, progress)
    device = resolve_device(config.device)
    dtype, dtype_reason = resolve_compute_dtype(config.dtype, device)
    draft_bytes = draft_load_bytes(draft_dir, config, device, dtype) if draft_dir else 0
    progress(f"loading {target_ref.display}" + (f" for {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    progress(dtype_reason)
    if device.type == "cuda":
        target, plan = _load_target_gpu(config, target_dir, draft_bytes, device, progress)
    else:
        target, plan = _load_target(config, target_dir, draft_bytes, dtype, progress)
    progress(plan.reason)
    draft = None
    if draft_dir is not None:
        progress(f"loading {draft_ref.display}")
        if config.draft_quant == "int8" and device.type == "cpu":  # a CPU speed-up; a GPU runs the draft in 16-bit
            draft = load_int8(draft_dir)
        else:
            draft = load_resident(draft_dir, dtype, str(device))
    engine = Engine(target.lm, draft.lm if draft else None, target.tokenizer, target.eos_token_ids)
    pipeline = Pipeline(
        engine, target, draft, target_ref.display, draft_ref.display if draft_ref else None, reason, plan, device, config, dtype
    )
    if draft is not None and config.budget is None:  # --budget auto runs on the cost model
        ensure_calibration(pipeline, config, progress)
    elif draft is not None and config.draft_batch is None:  # auto width: the saved step costs, if any (else width 8)
        pipeline.engine.calibration = load_calibration(calibration_file(), calibration_key(pipeline, config))
    return pipeline


def calibration_key(pipeline: Pipeline, config: RunConfig) -> str:
    """What the measured costs depend on: models, precisions, placement, threads, growth width."""
    from . import __version__

    return (
        f"{pipeline.target_name} quant={resolve_quant(config.quant, pipeline.offload.mode)} dtype={dtype_name(pipeline.compute_dtype)} "
        f"{'' if pipeline.device.type == 'cpu' else f'device={_device_label(pipeline.device)} '}"
        f"offload={pipeline.offload.mode}:{pipeline.offload.resident_layers}"
        f"{f'+{pipeline.offload.host_layers}' if pipeline.offload.host_layers else ''} "
        f"{f'store={config.store} ' if config.store and pipeline.offload.mode == 'ssd' else ''}"  # another disk, other times
        f"draft={pipeline.draft_name} {config.draft_quant} batch={config.generation().draft_batch} depth={config.max_depth} "
        f"threads={torch.get_num_threads()} specchat={__version__}"
    )


def _device_label(device: torch.device) -> str:
    """The accelerator by model: another GPU has other pass times."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def calibration_file() -> Path:
    """Kept with the config: the costs belong to this machine and these settings."""
    from .paths import config_file

    return config_file().parent / "calibration.json"


def ensure_calibration(pipeline: Pipeline, config: RunConfig, progress: Progress, force: bool = False) -> Calibration:
    """The engine's calibration: the saved one for these settings, else measured now and saved."""
    key = calibration_key(pipeline, config)
    calibration = None if force else load_calibration(calibration_file(), key)
    if calibration is None:
        progress("measuring pass times for --budget auto (once for these settings; `specchat setup` does it too)")
        engine = pipeline.engine
        growth_width = config.generation().draft_batch  # growth is timed at the fixed width; auto width rescales online
        calibration = measure_calibration(engine.target, engine.draft, config.max_depth, growth_width, progress=progress)
        save_calibration(calibration_file(), key, calibration)
        progress(f"calibration saved to {calibration_file()}")
    pipeline.engine.calibration = calibration
    pipeline.engine.tuners.clear()
    return calibration

