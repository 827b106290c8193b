"""The GPU placement and loading code (pipeline.gpu_plan / _load_target_gpu) run on the CPU.

No GPU has been lent to this project, so the GPU path is exercised here with the CPU standing in
for the device: ``torch.cuda.mem_get_info`` reports a chosen amount of free VRAM and the compute
dtype is float32; everything else -- the plan, the store, the host -> device ring, the 4-bit
layer files kept on the device -- is the code a GPU run takes.
"""

import pytest
import torch

from specchat import pipeline
from specchat.config import RunConfig
from specchat.lm import causal_visibility
from specchat.loading import load_resident
from specchat.pipeline import _load_target_gpu, resident_bytes, stored_dtype
from specchat.store import build_store, store_dir_for


def logits(lm, ids):
    ids = torch.tensor(ids)
    return lm.forward(ids, torch.arange(len(ids)), causal_visibility(0, len(ids)), lm.new_cache())


@pytest.fixture
def pretend_gpu(monkeypatch):
    """Free VRAM = the tiny target's non-layer weights + the 1 GiB headroom the plan keeps
    + (with ``ring``) two slots of a layer and its file + ``kept`` layers that stay on the device."""

    def with_room(target_dir, store, kept: int, ring: bool = True, four_bit: bool = False) -> None:
        per_layer = resident_bytes(target_dir, torch.float32, layers=True) // 2  # the tiny models have 2 layers
        other = resident_bytes(target_dir, torch.float32, layers=False)
        kept_bytes = store.layer_bytes if four_bit else per_layer
        free = other + (1 << 30) + (2 * (per_layer + store.layer_bytes) if ring else 0) + kept * kept_bytes + kept_bytes // 2
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))

    monkeypatch.setattr(pipeline, "compute_dtype_for", lambda device, choice="auto": torch.float32)
    return with_room


@pytest.mark.parametrize(
    "offload, quant, kept, expected",
    [
        ("auto", "16bit", 50, ("none", 2, 0)),  # fits: resident on the device
        ("ram", "16bit", 0, ("ram", 0, 2)),  # room for the ring only: both layers in pinned RAM
        ("ram", "16bit", 1, ("ram", 1, 1)),  # the ring and one layer on the device
        ("ssd", "16bit", 0, ("ssd", 0, 2)),  # half the RAM holds both layer files
        ("none", "4bit", 2, ("none", 2, 0)),  # 4-bit files kept on the device, dequantised per pass
        ("ram", "4bit", 1, ("ram", 1, 1)),
    ],
)
def test_gpu_placement_loads_and_matches_the_resident_forward(tiny_dirs, tmp_path, pretend_gpu, offload, quant, kept, expected):
    target = tiny_dirs["target"]
    dtype = "nf4" if quant == "4bit" else stored_dtype(target)
    store = build_store(target, store_dir_for(tmp_path / "stores", target, dtype), dtype, dense_dtype=stored_dtype(target))
    pretend_gpu(target, store, kept, four_bit=quant == "4bit")
    config = RunConfig(model=str(target), offload=offload, quant=quant, store=tmp_path / "stores")
    loaded, plan = _load_target_gpu(config, target, 0, torch.device("cpu"), lambda line: None)
    assert (plan.mode, plan.resident_layers, plan.host_layers) == expected, plan.reason
    reference = load_resident(target, torch.float32).lm
    ids = [3, 1, 4, 1, 5]
    if quant == "16bit":  # the store keeps this float32 model's layers in bf16
        ours, theirs = logits(loaded.lm, ids), logits(reference, ids)
        exact = plan.mode == "none"  # loaded straight from the model directory
        assert torch.allclose(ours, theirs, atol=1e-6 if exact else 2e-2)
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    else:  # 4-bit weights: not the 16-bit logits; it runs and gives numbers
        assert torch.isfinite(logits(loaded.lm, ids)).all()
    if plan.mode != "none" or quant == "4bit":
        source = loaded.lm.layer_source
        assert len(source.host) == plan.host_layers
        assert len(source.resident) + len(source.device_files) == plan.resident_layers


def test_not_enough_gpu_memory_is_refused_before_loading(tiny_dirs, tmp_path, pretend_gpu, monkeypatch):
    from specchat.errors import ResourceError

    target = tiny_dirs["target"]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10**6, 10**9))  # 1 MB free
    config = RunConfig(model=str(target), offload="none", store=tmp_path / "stores")
    with pytest.raises(ResourceError, match="not enough GPU memory to hold the target"):
        _load_target_gpu(config, target, 10**9, torch.device("cpu"), lambda line: None)
