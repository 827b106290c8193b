"""What this machine has, measured where it matters, and what to run on it."""

from __future__ import annotations

import mmap
import os
import platform
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import torch

from specchat.common.system import read_cpuinfo
from specchat.model.placement import RAM_HEADROOM, choose_cpu_mode, choose_gpu_mode
from specchat.model.selfdraft import DEFAULT_SELF_KIND, SELF_BYTES_PER_WEIGHT
from specchat.weights.precision import cpu_has_fast_bf16, dtype_name, resolve_compute_dtype
from specchat.sources.registry import DEMO_TARGET, ModelEntry, load_registry
from specchat.model.stream.storeio import READ_THREADS, read_file_direct

VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "asimd", "sve")
PROBE_BYTES = 256 << 20


def cpu_info() -> dict:
    info = read_cpuinfo()
    return {
        "name": info.name or platform.processor() or platform.machine(),
        "cores": psutil.cpu_count(logical=False) or os.cpu_count(),
        "threads": os.cpu_count(),
        "vector_extensions": [flag for flag in VECTOR_FLAGS if flag in info.flags],
    }


def gpu_info() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        props = torch.cuda.get_device_properties(index)
        gpus.append(
            {
                "name": props.name,
                "vram_total": total,
                "vram_free": free,
                "compute_capability": f"{props.major}.{props.minor}",
                "pinned_h2d_gbps": pinned_bandwidth(index) / 1e9,
            }
        )
    return gpus


def pinned_bandwidth(index: int, size: int = 256 << 20) -> float:
    """Bytes/s of a pinned host -> device copy."""
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(size, dtype=torch.uint8, device=f"cuda:{index}")
    device.copy_(host, non_blocking=True)
    torch.cuda.synchronize(index)
    start = time.perf_counter()
    for _ in range(4):
        device.copy_(host, non_blocking=True)
    torch.cuda.synchronize(index)
    return 4 * size / (time.perf_counter() - start)


def disk_bandwidth(directory: Path, size: int = PROBE_BYTES) -> tuple[float, bool]:
    """(bytes/s, O_DIRECT used) reading a fresh file the way the streamer reads layers."""
    directory.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=directory, prefix=".specchat-probe-")
    try:
        block = os.urandom(1 << 20)
        with os.fdopen(handle, "wb") as out:
            for _ in range(size >> 20):
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        fd = os.open(name, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # what we just wrote must come from disk
        os.close(fd)
        buffer = mmap.mmap(-1, size)
        with ThreadPoolExecutor(READ_THREADS) as pool:
            start = time.perf_counter()
            direct = read_file_direct(name, buffer, size, pool, direct=True)
            elapsed = time.perf_counter() - start
        buffer.close()
        return size / elapsed, direct
    finally:
        os.unlink(name)


def matmul_flops(dtype: torch.dtype = torch.float32, tokens: int = 256) -> float:
    """FLOP/s of a decoder-sized matrix product on the CPU, in ``dtype``."""
    weight = torch.randn(1536, 8960).to(dtype)
    activations = torch.randn(tokens, 1536).to(dtype)
    activations @ weight
    start = time.perf_counter()
    for _ in range(3):
        activations @ weight
    return 3 * 2 * tokens * 1536 * 8960 / (time.perf_counter() - start)


def detect(store_dir: Path) -> dict:
    memory = psutil.virtual_memory()
    probe_dir = store_dir if store_dir.exists() else store_dir.parent
    probe_dir.mkdir(parents=True, exist_ok=True)
    bandwidth, direct = disk_bandwidth(probe_dir)
    dtype, dtype_reason = resolve_compute_dtype("auto", torch.device("cpu"))
    return {
        "cpu": cpu_info()
        | {
            "fp32_gflops": matmul_flops() / 1e9,
            # measured only where bf16 is native: emulated, 256 rows would take seconds
            "bf16_gflops": matmul_flops(torch.bfloat16) / 1e9 if cpu_has_fast_bf16() else None,
            "compute_dtype": dtype_name(dtype),
            "compute_dtype_reason": dtype_reason,
        },
        "ram_total": memory.total,
        "ram_available": memory.available,
        "gpus": gpu_info(),
        "store_dir": str(store_dir),
        "disk_free": shutil.disk_usage(probe_dir).free,
        "disk_read_gbps": bandwidth / 1e9,
        "disk_direct_io": direct,
    }


def fit(entry: ModelEntry, facts: dict) -> str:
    """How the target would run here: "ram" (resident: in RAM on a CPU, in VRAM on a GPU),
    "pinned" (GPU only: layers in pinned RAM, copied in every pass), "ssd" (streamed), or "no".
    The same ``--offload auto`` rules as loading (:mod:`specchat.model.placement`), on the
    registry's parameter count."""
    weights_16bit = entry.bytes_at(16)
    if facts["gpus"]:
        mode, _ = choose_gpu_mode(weights_16bit, weights_16bit, facts["gpus"][0]["vram_free"], facts["ram_available"], None)
    else:
        cpu_bits = 16 if facts.get("cpu", {}).get("compute_dtype") in ("bfloat16", "float16") else 32
        mode, _ = choose_cpu_mode(entry.bytes_at(cpu_bits), facts["ram_available"], None)
    if mode in ("none", "ram"):
        return {"none": "ram", "ram": "pinned"}[mode]
    if weights_16bit * 2 < facts["disk_free"]:  # the download and the layer store
        return "ssd"
    return "no"


def recommend(facts: dict, registry: dict[str, ModelEntry] | None = None) -> dict[str, dict[str, str]]:
    """A target, draft, quant, offload and budget, each with one reason (from models.toml by default)."""
    registry = registry if registry is not None else load_registry()
    targets = sorted(
        (e for e in registry.values() if e.role in ("target", "both") and e.parts is None),
        key=lambda e: e.params_b,
        reverse=True,
    )
    choice = next((e for e in targets if fit(e, facts) != "no"), None)
    if choice is None:
        choice = registry[DEMO_TARGET]
    how = fit(choice, facts)
    drafts = [registry[d] for d in choice.drafts]
    draft = min(drafts, key=lambda e: e.params_b) if drafts else None
    gbps = facts["gpus"][0]["pinned_h2d_gbps"] if how == "pinned" else facts["disk_read_gbps"]
    stream_s = choice.bytes_at(16) / (gbps * 1e9) if gbps else float("inf")
    streams = how in ("ssd", "pinned")
    # A pass costs max(stream, compute); the tree may grow until compute catches up with the stream.
    cpu = facts["cpu"]
    bf16 = cpu.get("compute_dtype") == "bfloat16" and cpu.get("bf16_gflops")
    flops = (cpu["bf16_gflops"] if bf16 else cpu["fp32_gflops"]) * 1e9 if not facts["gpus"] else 200e12
    break_even = stream_s * flops / (2 * choice.params_b * 1e9)
    budget = 16
    while streams and budget * 2 <= min(break_even, 1024):
        budget *= 2
    return {
        "target": {"value": choice.name, "reason": f"the largest registered target that runs here ({how})"},
        "draft": _draft_advice(choice, draft, facts, streams),
        "quant": {"value": "16bit", "reason": "16-bit weights, the target's own outputs"},
        "dtype": {
            "value": "auto",
            "reason": "bfloat16 or float16 on the GPU" if facts["gpus"]
            else cpu.get("compute_dtype_reason", "float32 on this CPU") + (f" ({cpu['bf16_gflops']:.0f} vs {cpu['fp32_gflops']:.0f} GFLOP/s at 256 rows)" if bf16 else ""),
        },
        "offload": {
            "value": {"ram": "none", "pinned": "ram"}.get(how, "ssd"),
            "reason": {
                "ram": "it fits in memory",
                "pinned": "it does not fit the GPU but fits in RAM: layers are copied in from pinned RAM every pass",
            }.get(how, f"it does not fit in memory; one pass streams it in about {stream_s:.0f}s"),
        },
        "budget": {
            "value": str(budget),
            "reason": f"about where verifying the tree costs as much compute as streaming the target ({break_even:.0f} tokens)"
            if streams
            else "a resident target is compute-bound here: small trees",
        },
    }


def _draft_advice(target: ModelEntry, sibling: ModelEntry | None, facts: dict, streams: bool) -> dict[str, str]:
    """What ``--draft auto`` will take (:mod:`specchat.app.drafts`): on a CPU streaming the target,
    the target's own low-bit copy where it fits the available RAM (``run`` checks the exact room
    beside the target's resident share), else the smallest registered draft."""
    self_bytes = target.bytes_at(8) * SELF_BYTES_PER_WEIGHT[DEFAULT_SELF_KIND] * RAM_HEADROOM
    if streams and not facts["gpus"] and self_bytes <= facts["ram_available"]:
        return {
            "value": f"self:{DEFAULT_SELF_KIND}",
            "reason": f"the target streams every pass, so its own layers in {DEFAULT_SELF_KIND} ({self_bytes / 1e9:.1f} GB in RAM) "
            f"agree with it far more often than {sibling.name if sibling else 'a smaller model'}: more tokens per pass",
        }
    if sibling is None:
        return {"value": "none", "reason": "no registered draft"}
    return {"value": sibling.name, "reason": "the smallest registered draft of that target: its steps are the cheapest"}
