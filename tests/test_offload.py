"""The layer store and the SSD streamer: streamed forward == resident forward, bytes really read."""

import json
import os

import pytest
import torch

from specchat.common.errors import CorruptModel
from specchat.common.iostats import disk_read_bytes
from specchat.model.lm import LayeredLM, causal_visibility
from specchat.model.loading import load_resident
from specchat.model.placement import plan_offload
from specchat.sources.facts import read_facts
from specchat.model.stream.build import load_streamed
from specchat.weights.quant4 import quantizable, roundtrip_nf4
from specchat.weights.store import MANIFEST, build_store, open_store, store_layout

from tiny import tiny_hf


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("offload") / "model"
    model = tiny_hf(4, arch="qwen2", layers=4, dtype=torch.float32)
    model.save_pretrained(path)
    return path


def logits(lm: LayeredLM, ids) -> torch.Tensor:
    ids = torch.tensor(ids)
    return lm.forward(ids, torch.arange(len(ids)), causal_visibility(0, len(ids)), lm.new_cache())


def tree_logits(lm: LayeredLM) -> torch.Tensor:
    """A 3-token prefix in the cache, then a 3-node tree (root 7 with children 8 and 9) over it."""
    cache = lm.new_cache()
    lm.forward(torch.tensor([1, 2, 3]), torch.arange(3), causal_visibility(0, 3), cache)
    visible = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 1]], dtype=torch.bool)
    return lm.forward(torch.tensor([7, 8, 9]), torch.tensor([3, 4, 4]), visible, cache)


@pytest.mark.parametrize("dtype, atol", [("float32", 1e-6), ("float16", 2e-2), ("bfloat16", 1e-1)])
@pytest.mark.parametrize("resident_layers", [0, 2])
def test_streamed_forward_equals_resident_forward(model_dir, tmp_path, dtype, atol, resident_layers):
    store = build_store(model_dir, tmp_path / "store", dtype)
    streamed = load_streamed(store, torch.float32, resident_layers=resident_layers)
    resident = load_resident(model_dir, torch.float32).lm
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    assert torch.allclose(logits(streamed, ids), logits(resident, ids), atol=atol)
    # A second pass through the same ring (slots reused) gives the same answer.
    assert torch.equal(logits(streamed, ids), logits(streamed, ids))


def test_streamed_forward_with_a_cache_and_a_tree_mask(model_dir, tmp_path):
    store = build_store(model_dir, tmp_path / "store", "float32")
    streamed, resident = load_streamed(store), load_resident(model_dir).lm
    assert torch.allclose(tree_logits(streamed), tree_logits(resident), atol=1e-6)


def test_ssd_mode_reads_the_streamed_layers_every_pass(model_dir, tmp_path):
    store = build_store(model_dir, tmp_path / "store", "float16")
    streamed = load_streamed(store, resident_layers=1)
    logits(streamed, [1, 2])  # first pass also verifies checksums
    before, requested = disk_read_bytes(), streamed.bytes_read()
    for _ in range(3):
        logits(streamed, [1, 2, 3])
    expected = 3 * 3 * store.layer_bytes  # 3 passes x 3 streamed layers
    assert streamed.bytes_read() - requested == expected
    if os.path.exists("/proc/self/io"):
        assert abs((disk_read_bytes() - before) - expected) <= 0.1 * expected


def test_a_long_prefill_reads_each_streamed_layer_once_and_fills_the_cache_as_a_resident_forward(model_dir, tmp_path):
    store = build_store(model_dir, tmp_path / "store", "float32")
    streamed, resident = load_streamed(store, resident_layers=1), load_resident(model_dir).lm
    ids = torch.tensor([(5 * i) % 60 + 1 for i in range(50)])
    logits(streamed, [1, 2])  # first pass also verifies checksums
    requested, cache = streamed.bytes_read(), streamed.new_cache()
    shares = list(streamed.prefill(ids[:40], 0, cache, chunk=8))  # 5 chunks of 8 through 4 layers
    assert streamed.bytes_read() - requested == 3 * store.layer_bytes  # one read of each of the 3 streamed layers
    assert shares == [step / 20 for step in range(1, 21)]
    fresh = resident.new_cache()
    resident.forward(ids[:40], torch.arange(40), causal_visibility(0, 40), fresh)
    for layer in range(4):
        assert torch.allclose(cache._keys[layer][:, :, :40], fresh._keys[layer][:, :, :40], atol=1e-5)
    rest = streamed.forward(ids[40:], torch.arange(40, 50), causal_visibility(40, 10), cache)
    assert torch.allclose(rest, logits(resident, ids.tolist())[40:], atol=1e-5)


def test_store_build_resumes_and_never_trusts_a_half_written_store(model_dir, tmp_path):
    path = tmp_path / "store"
    store = build_store(model_dir, path, "float16")
    (path / MANIFEST).unlink()
    (path / "layer_002.bin").unlink()
    (path / "layer_003.bin.partial").write_bytes(b"junk")
    with pytest.raises(CorruptModel, match="incomplete"):
        open_store(path)
    rebuilt = build_store(model_dir, path, "float16")
    assert rebuilt == store
    assert not list(path.glob("*.partial"))


def test_a_store_that_cannot_fit_the_disk_is_refused_before_writing(model_dir, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from specchat.common.errors import ResourceError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 4096, 4096))
    with pytest.raises(ResourceError, match="not enough disk for the layer store"):
        build_store(model_dir, tmp_path / "store", "float16")
    assert not list((tmp_path / "store").glob("layer_*"))


def test_a_disk_that_fills_up_mid_build_leaves_nothing_a_later_run_would_trust(model_dir, tmp_path, monkeypatch):
    import errno

    from specchat.common.errors import ResourceError

    path = tmp_path / "store"
    real_fsync, calls = os.fsync, []

    def fsync_until_full(fd):
        calls.append(fd)
        if len(calls) == 4:  # building.json, then the third layer file hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_until_full)
    with pytest.raises(ResourceError, match="the disk filled up while writing .*layer_002.bin"):
        build_store(model_dir, path, "float16")
    assert sorted(p.name for p in path.iterdir()) == [".lock", "building.json", "layer_000.bin", "layer_001.bin"]  # no .partial, no manifest
    with pytest.raises(CorruptModel, match="incomplete"):
        open_store(path)
    monkeypatch.setattr(os, "fsync", real_fsync)
    resumed = build_store(model_dir, path, "float16")  # space again: the build resumes and completes
    fresh = build_store(model_dir, tmp_path / "fresh", "float16")
    assert resumed.crc32 == fresh.crc32


def _save_weights(directory, seed):
    tiny_hf(seed, arch="qwen2", layers=4, dtype=torch.float32).save_pretrained(directory)


@pytest.mark.parametrize("finished", [True, False])
def test_a_store_of_other_weights_is_rebuilt_not_reused(tmp_path, monkeypatch, finished):
    """The model was re-downloaded or re-converted in place: same directory, new weights."""
    import errno

    from specchat.common.errors import ResourceError

    model, path = tmp_path / "model", tmp_path / "store"
    _save_weights(model, 4)
    if finished:
        build_store(model, path, "float16")
    else:  # a build that stopped after two layers
        real_fsync, calls = os.fsync, []

        def fsync_until_full(fd):
            calls.append(fd)
            if len(calls) == 4:
                raise OSError(errno.ENOSPC, "No space left on device")
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync_until_full)
        with pytest.raises(ResourceError):
            build_store(model, path, "float16")
        monkeypatch.setattr(os, "fsync", real_fsync)
    _save_weights(model, 5)
    rebuilt = build_store(model, path, "float16")
    fresh_dir = tmp_path / "fresh-model"
    _save_weights(fresh_dir, 5)
    fresh = build_store(fresh_dir, tmp_path / "fresh", "float16")
    assert rebuilt.crc32 == fresh.crc32
    assert build_store(model, path, "float16") == rebuilt  # and now it is reused
    assert not (path / "building.json").exists()


def test_truncated_and_corrupt_layer_files_are_refused(model_dir, tmp_path):
    path = tmp_path / "store"
    build_store(model_dir, path, "float16")
    layer = path / "layer_001.bin"
    data = layer.read_bytes()
    layer.write_bytes(data[:-4096])
    with pytest.raises(CorruptModel, match="truncated"):
        open_store(path)
    layer.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])
    streamed = load_streamed(open_store(path))
    with pytest.raises(CorruptModel, match="checksum"):
        logits(streamed, [1, 2])
    manifest = json.loads((path / MANIFEST).read_text())
    (path / MANIFEST).write_text(json.dumps({**manifest, "format": 99}))
    with pytest.raises(CorruptModel, match="damaged"):
        open_store(path)


@pytest.mark.parametrize(
    "mode, model_gb, ram_gb, budget_gb, expected_mode, expected_resident",
    [
        ("auto", 4, 16, None, "none", 10),
        ("auto", 40, 16, None, "ssd", 2),  # half the RAM less two ring slots = 4 GB: two 2 GB layers
        ("auto", 4, 16, 1.0, "ssd", 0),
        ("ssd", 4, 16, 5.0, "ssd", 2),
        ("ssd", 4, 16, 100.0, "ssd", 10),
        ("none", 40, 16, None, "none", 10),
    ],
)
def test_offload_plan(mode, model_gb, ram_gb, budget_gb, expected_mode, expected_resident):
    gb = 10**9
    budget = int(budget_gb * gb) if budget_gb is not None else None
    plan = plan_offload(mode, 10, 2 * gb, model_gb * gb, ram_gb * gb, budget)
    assert (plan.mode, plan.resident_layers) == (expected_mode, expected_resident)


def test_model_facts_count_every_parameter_and_size_the_layer_files(model_dir, tmp_path):
    facts = read_facts(model_dir)
    resident = load_resident(model_dir).lm
    layer = next(resident.layer_source.layers())
    assert facts.layer_bytes(torch.float32) == sum(p.numel() * 4 for p in layer.parameters())
    for dtype in ("float16", "nf4"):  # placement plans with the file size before the store exists
        store = build_store(model_dir, tmp_path / dtype, dtype)
        assert store_layout(facts.layer_shapes, dtype, "float16")[1] == store.layer_bytes


def nf4_reference(model_dir) -> LayeredLM:
    """The resident model with its weights as a 4-bit store gives them back."""
    lm = load_resident(model_dir, torch.float32).lm
    with torch.no_grad():
        for layer in lm.layer_source.layers():
            for name, param in layer.named_parameters():
                param.copy_(roundtrip_nf4(param) if quantizable(name, tuple(param.shape)) else param.half().float())
        for module in (lm.embed_tokens, lm.norm, lm.lm_head):
            module.weight.copy_(module.weight.half().float())
    return lm


@pytest.mark.parametrize("resident_layers", [0, 2])
def test_nf4_streamed_forward_equals_resident_forward_of_the_same_4bit_weights(model_dir, tmp_path, resident_layers):
    store = build_store(model_dir, tmp_path / "store", "nf4")
    assert {slot.dtype for slot in store.layout} == {"nf4", "float16"}
    streamed = load_streamed(store, torch.float32, resident_layers=resident_layers)
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    assert torch.allclose(logits(streamed, ids), logits(nf4_reference(model_dir), ids), atol=1e-5)
    # ... and 4-bit is an approximation of the 16-bit model, not something else.
    full = logits(load_resident(model_dir, torch.float32).lm, ids)
    assert (logits(streamed, ids).argmax(-1) == full.argmax(-1)).float().mean() >= 0.5


def test_nf4_store_streams_about_4_5_bits_per_weight(model_dir, tmp_path):
    store = build_store(model_dir, tmp_path / "store", "nf4")
    fp16 = build_store(model_dir, tmp_path / "store16", "float16")
    weights = sum(torch.Size(s.shape).numel() for s in store.layout if s.dtype == "nf4")
    assert sum(s.nbytes for s in store.layout if s.dtype == "nf4") == weights // 2 + weights // 64 * 4
    streamed = load_streamed(store, resident_layers=1)
    logits(streamed, [1, 2])
    before, requested = disk_read_bytes(), streamed.bytes_read()
    logits(streamed, [1, 2, 3])
    assert streamed.bytes_read() - requested == 3 * store.layer_bytes
    # Tiny tensors are padded to 4 KiB each; the payload is what shrinks.
    assert sum(s.nbytes for s in store.layout) < 0.3 * sum(s.nbytes for s in fp16.layout)
    if os.path.exists("/proc/self/io"):
        assert abs((disk_read_bytes() - before) - 3 * store.layer_bytes) <= 0.1 * 3 * store.layer_bytes


def test_nf4_roundtrip_error_is_within_the_4bit_grid():
    weight = torch.randn(64, 128)
    error = (roundtrip_nf4(weight) - weight).abs().view(-1, 64)
    absmax = weight.view(-1, 64).abs().amax(dim=1, keepdim=True)
    assert (error <= absmax * 0.17).all()  # half the widest gap between NF4 levels is ~0.15
    assert error.mean() < 0.1 * weight.abs().mean()


# --- the host -> device ring (specchat.model.stream.device), run on the CPU: no pinning, no streams ---


@pytest.mark.parametrize("dtype, atol", [("float32", 1e-6), ("bfloat16", 1e-1)])
@pytest.mark.parametrize(
    "on_device, in_host",
    [(0, 0), (0, 4), (1, 1), (2, 2), (4, 0)],  # (layers kept on the device, in host RAM); the rest from the store
)
def test_device_ring_forward_equals_resident_forward(model_dir, tmp_path, dtype, atol, on_device, in_host):
    store = build_store(model_dir, tmp_path / "store", dtype)
    streamed = load_streamed(store, torch.float32, resident_layers=on_device, host_layers=in_host, copy_to_device=True)
    source = streamed.layer_source
    assert len(source.resident) == on_device and len(source.host) == in_host
    assert source.from_store == list(range(on_device + in_host, 4))
    resident = load_resident(model_dir, torch.float32).lm
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    assert torch.allclose(logits(streamed, ids), logits(resident, ids), atol=atol)
    assert torch.equal(logits(streamed, ids), logits(streamed, ids))  # slots and staging buffers reused


def test_device_ring_with_a_cache_and_a_tree_mask_and_ring_of_three(model_dir, tmp_path):
    store = build_store(model_dir, tmp_path / "store", "float32")
    streamed = load_streamed(store, host_layers=1, ring=3, copy_to_device=True)
    resident = load_resident(model_dir).lm
    assert torch.allclose(tree_logits(streamed), tree_logits(resident), atol=1e-6)


def test_device_ring_reads_only_the_store_layers_every_pass(model_dir, tmp_path):
    store = build_store(model_dir, tmp_path / "store", "float16")
    streamed = load_streamed(store, resident_layers=1, host_layers=1, copy_to_device=True)
    logits(streamed, [1, 2])
    requested = streamed.bytes_read()
    for _ in range(3):
        logits(streamed, [1, 2, 3])
    assert streamed.bytes_read() - requested == 3 * 2 * store.layer_bytes  # 3 passes x 2 layers from the store
    assert streamed.layer_source.resident_bytes() == store.layer_bytes  # one layer file in host RAM


def test_device_ring_nf4_equals_the_resident_4bit_weights(model_dir, tmp_path):
    store = build_store(model_dir, tmp_path / "store", "nf4")
    streamed = load_streamed(store, torch.float32, resident_layers=1, host_layers=1, copy_to_device=True)
    ids = [2, 7, 1, 8, 2, 8]
    assert torch.allclose(logits(streamed, ids), logits(nf4_reference(model_dir), ids), atol=1e-4)


@pytest.mark.parametrize(
    "mode, vram_gb, ram_gb, budget_gb, expected",
    [
        ("auto", 40, 64, None, ("none", 10, 0)),  # 10 x 1 GB layers + 1 GB other fit a 40 GB GPU
        # 9 GB GPU: 9 - 1 other - 2 x (1 + 0.5) ring - 1 GiB headroom = 3.9 GB: 3 layers stay on it
        ("auto", 9, 64, None, ("ram", 3, 7)),  # the 5 GB of layer files fit in RAM
        ("auto", 9, 4, None, ("ssd", 3, 2)),  # they do not: half the RAM keeps 2, 5 stream from the store
        ("ssd", 9, 64, 3, ("ssd", 3, 6)),  # --ram-budget 3 GB keeps 6 layer files
        ("ram", 40, 64, None, ("ram", 10, 0)),
        ("ssd", 2, 64, 0, ("ssd", 0, 0)),
    ],
)
def test_gpu_offload_plan(mode, vram_gb, ram_gb, budget_gb, expected):
    from specchat.model.placement import plan_offload_gpu

    gb = 10**9
    plan = plan_offload_gpu(
        mode, 10, 1 * gb, gb // 2, 1 * gb, vram_gb * gb, ram_gb * gb, None if budget_gb is None else budget_gb * gb
    )
    assert (plan.mode, plan.resident_layers, plan.host_layers) == expected, plan.reason


@pytest.mark.parametrize("kept", [1, 4])
def test_device_ring_keeps_4bit_layer_files_on_the_device(model_dir, tmp_path, kept):
    store = build_store(model_dir, tmp_path / "store", "nf4")
    streamed = load_streamed(store, torch.float32, resident_layers=kept, copy_to_device=True, keep_files=True)
    source = streamed.layer_source
    assert len(source.device_files) == kept and not source.resident
    assert source.order == [0, 1, 2, 3]  # every layer passes through a slot, dequantised there
    ids = [2, 7, 1, 8, 2, 8]
    assert torch.allclose(logits(streamed, ids), logits(nf4_reference(model_dir), ids), atol=1e-4)
    requested = streamed.bytes_read()
    logits(streamed, ids)
    assert streamed.bytes_read() - requested == (4 - kept) * store.layer_bytes


@pytest.mark.parametrize("checkpoint", [torch.float16, torch.bfloat16])
def test_a_16bit_embedding_table_stays_16bit_and_changes_no_logit(tmp_path, checkpoint):
    """On a CPU the untied embedding table keeps its checkpoint dtype (half the RAM of float32);
    the rows it hands on are the exact float32 values, so the forward is unchanged."""
    from transformers import AutoModelForCausalLM

    from specchat.model.lm import UpcastEmbedding

    path = tmp_path / "model"
    tiny_hf(5, arch="qwen2", layers=2, dtype=checkpoint).save_pretrained(path)
    plain = LayeredLM(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval())  # float32 table
    resident = load_resident(path, torch.float32).lm
    streamed = load_streamed(build_store(path, tmp_path / "store", str(checkpoint).removeprefix("torch.")), torch.float32)
    for lm in (resident, streamed):
        assert isinstance(lm.embed_tokens, UpcastEmbedding) and lm.embed_tokens.weight.dtype == checkpoint
    ids = [3, 1, 4, 1, 5, 9]
    for lm in (resident, streamed):  # the exact rows of the float32 table
        assert torch.equal(lm.embed_tokens(torch.tensor(ids)), plain.embed_tokens(torch.tensor(ids)))
        assert torch.allclose(logits(lm, ids), logits(plain, ids), atol=1e-6)


def test_a_tied_or_float32_embedding_stays_as_it_was(model_dir):
    from specchat.model.lm import UpcastEmbedding

    assert not isinstance(load_resident(model_dir, torch.float32).lm.embed_tokens, UpcastEmbedding)  # float32 checkpoint


def _nf4_reference(packed, absmax, shape):
    """NF4 by its definition: two 4-bit code indices per byte (high nibble first), times each 64-block's absmax."""
    from specchat.weights import quant4

    code = quant4._bnb().get_4bit_type("nf4", device="cpu")
    indices = torch.stack([packed.long() >> 4, packed.long() & 15], dim=-1).view(-1)  # (n,)
    return (code[indices].view(-1, quant4.BLOCK) * absmax.view(-1, 1)).view(shape)


@pytest.mark.parametrize("shape", [(96, 128), (64, 32), (4096,)])  # rows of 32: blocks span rows
def test_nf4_into_a_float32_parameter_equals_the_definition(monkeypatch, shape):
    """The in-place kernel and the fallback (bitsandbytes' op, then a copy) both give NF4's exact values.

    (64, 32) is the case bitsandbytes' own CPU op gets wrong on an AVX-512 machine when handed
    the 2-D shape: it reads one absmax per row while the 64-weight blocks span two rows."""
    from specchat.weights import quant4

    weight = torch.randn(shape)
    packed, absmax = quant4.quantize_nf4(weight)
    expected = _nf4_reference(packed, absmax, weight.shape)
    into = torch.full(weight.shape, float("nan"))
    assert quant4.dequantize_nf4(packed, absmax, tuple(weight.shape), out=into) is into
    assert torch.equal(into, expected)
    monkeypatch.setattr(quant4, "_CPU_KERNELS", {})  # a bitsandbytes without the kernel: the op, then a copy
    fallback = torch.full(weight.shape, float("nan"))
    assert torch.equal(quant4.dequantize_nf4(packed, absmax, tuple(weight.shape), out=fallback), expected)
    assert torch.equal(quant4.dequantize_nf4(packed, absmax, tuple(weight.shape)).float(), expected.to(quant4.DEQUANT_DTYPE).float())


@pytest.mark.parametrize("store_dtype, compute, zero_copy", [("bfloat16", torch.bfloat16, True), ("float16", torch.float32, False)])
def test_a_store_in_the_compute_dtype_streams_without_copying(model_dir, tmp_path, store_dtype, compute, zero_copy):
    store = build_store(model_dir, tmp_path / "store", store_dtype)
    streamed = load_streamed(store, compute, resident_layers=1)
    source = streamed.layer_source
    assert source.zero_copy is zero_copy
    if zero_copy:  # every slot's weights are its read buffer's bytes; twice the ring for the same RAM
        assert len(source.buffers) == min(4, len(source.streamed))
        for slot, buffer in zip(source.slots, source.buffers):
            assert all(p.data_ptr() == v.data_ptr() for p, v in zip(slot.params, buffer.views))
    reference = load_resident(model_dir, compute).lm
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    first, second = logits(streamed, ids), logits(streamed, ids)  # the ring's buffers are reused
    assert torch.equal(first, second)
    if zero_copy:
        assert torch.equal(first, logits(reference, ids))


@pytest.mark.parametrize("store_dtype, compute", [("bfloat16", torch.bfloat16), ("float16", torch.float32)])
def test_prefetch_reads_the_first_layers_before_the_pass_and_changes_nothing_else(model_dir, tmp_path, store_dtype, compute):
    store = build_store(model_dir, tmp_path / "store", store_dtype)
    streamed = load_streamed(store, compute, resident_layers=1)
    source = streamed.layer_source
    expected = logits(streamed, [1, 2, 3])
    before = streamed.bytes_read()
    streamed.prefetch()
    streamed.prefetch()  # a second hint before the pass starts nothing more
    state = source._prefetched
    for future in list(state.fills.values()):
        future.result()
    for future in list(state.reads.values()):  # with conversion, a filled slot frees its buffer for one more read
        future.result()
    ahead = min(len(source.buffers) + (0 if source.zero_copy else len(source.slots)), len(source.streamed))
    assert streamed.bytes_read() - before == ahead * store.layer_bytes  # read while nothing computed
    assert torch.equal(logits(streamed, [1, 2, 3]), expected)
    assert streamed.bytes_read() - before == len(source.streamed) * store.layer_bytes  # each layer once per pass
    assert torch.equal(logits(streamed, [1, 2, 3]), expected)  # and a pass without a hint still reads it all


def test_the_engine_hints_a_streamed_target_before_drafting(model_dir, tmp_path):
    from specchat.engine.config import GenerationConfig
    from specchat.engine.engine import Engine

    from tiny import CharTokenizer, tiny_lm

    store = build_store(model_dir, tmp_path / "store", "float32")
    streamed = load_streamed(store, torch.float32)
    hints = []
    original = streamed.prefetch
    streamed.prefetch = lambda: (hints.append(streamed.bytes_read()), original())
    resident = load_resident(model_dir, torch.float32).lm
    draft = tiny_lm(1, vocab=resident.vocab_size)
    config = GenerationConfig(method="specexec", budget=4, max_new_tokens=6)
    ours = list(Engine(streamed, draft, CharTokenizer(), []).generate([1, 2, 3], config))[-1]
    plain = list(Engine(resident, None, CharTokenizer(), []).generate([1, 2, 3], GenerationConfig(method="ar", max_new_tokens=6)))[-1]
    assert ours.token_ids == plain.token_ids and len(hints) == ours.stats.target_passes


def test_bitsandbytes_optional_kernel_warning_stays_off_stderr():
    """On AVX512-BF16 CPUs bitsandbytes logs that it could not fetch a 4-bit matmul kernel we never use."""
    import subprocess
    import sys

    code = "import specchat.weights.quant4 as q, torch; q._bnb(); import bitsandbytes"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "kernels-community" not in result.stderr


def test_a_streamed_pass_says_when_it_waits_for_the_disk_and_a_lookahead_gated_on_it_keeps_the_reply_exact(model_dir, tmp_path):
    import threading
    import time

    from specchat.engine.config import GenerationConfig
    from specchat.engine.engine import Engine
    from specchat.speculation.lookahead import Lookahead

    from tiny import CharTokenizer

    store = build_store(model_dir, tmp_path / "store", "float32")
    streamed = load_streamed(store, torch.float32)
    reader = streamed.layer_source.reader
    read_into = reader.read_into
    reader.read_into = lambda *args, **kwargs: (time.sleep(0.02), read_into(*args, **kwargs))[1]  # a slow disk
    waiting, seen, done = streamed.waiting_for_layers, [], threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.append(waiting.is_set())
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    expected = logits(streamed, [1, 2, 3])
    done.set()
    watcher.join()
    assert any(seen) and not waiting.is_set()  # set while it waited, clear once the pass is over
    resident = load_resident(model_dir, torch.float32).lm
    assert torch.allclose(expected, logits(resident, [1, 2, 3]), atol=1e-6)
    config = GenerationConfig(method="specexec", budget=4, max_new_tokens=12)
    ours = list(Engine(streamed, resident, CharTokenizer(), [], lookahead=Lookahead()).generate([1, 2, 3], config))[-1]
    plain = list(Engine(resident, None, CharTokenizer(), []).generate([1, 2, 3], GenerationConfig(method="ar", max_new_tokens=12)))[-1]
    assert ours.token_ids == plain.token_ids
