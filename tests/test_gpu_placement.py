"""The GPU placement and loading code (placement.place_target / target.load_target) run on the CPU.

No GPU has been lent to this project, so the GPU path is exercised here with the CPU standing in
for the device: the plan is made for a GPU with a chosen amount of free VRAM, and the compute
dtype is float32; everything else -- the plan, the store, the host -> device ring, the 4-bit
layer files kept on the device -- is the code a GPU run takes.
"""

import psutil
import pytest
import torch

from specchat.model.lm import causal_visibility
from specchat.model.loading import load_resident
from specchat.model.placement import Machine, Memory, place_target
from specchat.model.target import load_target
from specchat.sources.facts import read_facts
from specchat.weights.store import build_store, store_dir_for

GPU = torch.device("cuda")  # what the plan is made for; the loading then runs with the CPU as the device


def load_as_if_on_gpu(target_dir, offload, quant, store_root, vram_free, draft_bytes=0):
    """Plan for a GPU with ``vram_free`` bytes free, then load that plan with the CPU standing in."""
    facts = read_facts(target_dir)
    memory = Memory(psutil.virtual_memory().available, vram_free)
    plan = place_target(facts, offload, quant, None, torch.float32, GPU, memory, draft_bytes)
    cpu_standing_in = Machine(torch.device("cpu"), torch.float32, memory)
    loaded = load_target(facts, plan, cpu_standing_in, draft_bytes, store_root, lambda line: None)
    return loaded, plan


def logits(lm, ids):
    ids = torch.tensor(ids)
    return lm.forward(ids, torch.arange(len(ids)), causal_visibility(0, len(ids)), lm.new_cache())


def vram_with_room(target_dir, store, kept: int, four_bit: bool = False) -> int:
    """Free VRAM = the tiny target's non-layer weights + the 1 GiB headroom the plan keeps
    + two slots of a layer and its file + ``kept`` layers that stay on the device (+ half a layer)."""
    facts = read_facts(target_dir)
    per_layer, other = facts.layer_bytes(torch.float32), facts.other_bytes(torch.float32)
    kept_bytes = store.layer_bytes if four_bit else per_layer
    return other + (1 << 30) + 2 * (per_layer + store.layer_bytes) + kept * kept_bytes + kept_bytes // 2


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
def test_gpu_placement_loads_and_matches_the_resident_forward(tiny_dirs, tmp_path, offload, quant, kept, expected):
    target = tiny_dirs["target"]
    stored = read_facts(target).stored_dtype
    dtype = "nf4" if quant == "4bit" else stored
    store = build_store(target, store_dir_for(tmp_path / "stores", target, dtype), dtype, dense_dtype=stored)
    vram = vram_with_room(target, store, kept, four_bit=quant == "4bit")
    loaded, plan = load_as_if_on_gpu(target, offload, quant, tmp_path / "stores", vram)
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


def test_not_enough_gpu_memory_is_refused_before_loading(tiny_dirs, tmp_path):
    from specchat.common.errors import ResourceError

    with pytest.raises(ResourceError, match="not enough GPU memory to hold the target"):
        load_as_if_on_gpu(tiny_dirs["target"], "none", "16bit", tmp_path / "stores", 10**6, draft_bytes=10**9)  # 1 MB free
