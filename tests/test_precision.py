"""``--dtype``: which compute dtype a CPU gets, and a bfloat16 target loaded, stored and streamed."""

import pytest
import torch
from typer.testing import CliRunner

from specchat.weights import precision
from specchat.cli.app import app
from specchat.app.config import RunConfig
from specchat.common.errors import ConfigError
from specchat.model.lm import causal_visibility
from specchat.model.loading import load_resident
from specchat.model.stream.build import load_streamed
from specchat.app.calibration import calibration_key
from specchat.app.loader import load_pipeline
from specchat.model.placement import store_dtype_for
from specchat.sources.facts import read_facts
from specchat.weights.quant4 import dequantize_nf4, quantize_nf4
from specchat.weights.store import build_store

runner = CliRunner()
CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "choice, flags, expected, reason",
    [
        ("auto", {"avx2", "amx_bf16", "avx512_bf16"}, torch.bfloat16, "the CPU has amx_bf16"),
        ("auto", {"avx512f", "avx512_bf16"}, torch.bfloat16, "the CPU has avx512_bf16"),
        ("auto", {"avx2", "fma"}, torch.float32, "no bf16 matrix instructions"),
        ("auto", set(), torch.float32, "no bf16 matrix instructions"),
        ("float32", {"amx_bf16"}, torch.float32, "--dtype float32"),
        ("bfloat16", {"amx_bf16"}, torch.bfloat16, "--dtype bfloat16"),
        ("bfloat16", {"avx2"}, torch.bfloat16, "expect it slower than float32"),
        ("float16", set(), torch.float16, "--dtype float16"),
    ],
)
def test_the_cpu_compute_dtype_follows_the_cpus_bf16_instructions(choice, flags, expected, reason):
    dtype, why = precision.resolve_compute_dtype(choice, CPU, flags)
    assert dtype == expected and reason in why


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 amx_bf16\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert precision.cpu_flags(cpuinfo) == {"fpu", "avx2", "amx_bf16"}
    assert precision.cpu_flags(tmp_path / "absent") == set()


def test_saved_timings_are_kept_under_the_processor_and_the_code(tmp_path):
    from specchat.common.system import CpuInfo, measurement_identity, source_digest

    identity = measurement_identity(CpuInfo("AMD EPYC  9R45 ", frozenset()))
    assert identity.startswith("cpu=AMD_EPYC_9R45 specchat=")
    assert measurement_identity(CpuInfo(None, frozenset())).startswith("cpu=unknown ")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    before = source_digest(tmp_path)
    assert len(before) == 12 and source_digest(tmp_path) == before
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")  # an edited checkout: its timings are measured again
    assert source_digest(tmp_path) != before


def test_an_unknown_dtype_is_refused():
    with pytest.raises(ConfigError, match="--dtype must be one of auto, float32, bfloat16, float16"):
        RunConfig(dtype="int4")
    result = runner.invoke(app, ["run", "--dtype", "fp8", "the sea"])
    assert result.exit_code != 0 and result.stderr.strip().splitlines()[-1].startswith("error: --dtype must be one of")


def test_a_16bit_compute_dtype_gets_a_store_in_that_dtype(tiny_dirs):
    target = read_facts(tiny_dirs["target"])  # a float32 checkpoint
    assert store_dtype_for("16bit", target, torch.bfloat16) == "bfloat16"
    assert store_dtype_for("16bit", target, torch.float16) == "float16"
    assert store_dtype_for("16bit", target, torch.float32) == target.stored_dtype == "bfloat16"
    assert store_dtype_for("4bit", target, torch.bfloat16) == "nf4"


def logits(lm, ids):
    ids = torch.tensor(ids)
    return lm.forward(ids, torch.arange(len(ids)), causal_visibility(0, len(ids)), lm.new_cache())


@pytest.mark.parametrize("resident_layers", [0, 1])
def test_a_bf16_store_streams_exactly_the_resident_bf16_forward(tiny_dirs, tmp_path, resident_layers):
    target = tiny_dirs["target"]
    store = build_store(target, tmp_path / "store", "bfloat16")
    streamed = load_streamed(store, torch.bfloat16, resident_layers=resident_layers)
    resident = load_resident(target, torch.bfloat16).lm
    assert streamed.dtype == resident.dtype == torch.bfloat16
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    assert torch.equal(logits(streamed, ids), logits(resident, ids))  # the same bf16 weights, the same products


@pytest.mark.parametrize("offload", ["none", "ssd"])
def test_a_bf16_pipeline_runs_and_its_calibration_is_kept_apart(tiny_dirs, tmp_path, offload):
    config = RunConfig(model=str(tiny_dirs["target"]), draft=str(tiny_dirs["draft"]), dtype="bfloat16", offload=offload,
                       store=tmp_path / "stores", ram_budget=1 if offload == "ssd" else None, budget=4)
    lines = []
    pipeline = load_pipeline(config, lines.append)
    assert pipeline.compute_dtype == torch.bfloat16 and pipeline.engine.target.dtype == torch.bfloat16
    assert any(line.startswith("compute bfloat16: --dtype bfloat16") for line in lines)
    if offload == "ssd":
        assert "(bfloat16)" in pipeline.offload.reason  # the store holds bf16: layers are used as read
    assert "dtype=bfloat16" in calibration_key(pipeline, config)
    ids = pipeline.encode_chat([{"role": "user", "content": "the sea"}])
    events = list(pipeline.engine.generate(ids, config.generation()))
    assert events[-1].stats.new_tokens >= 1


@pytest.mark.parametrize("shape", [(96, 128), (64, 32)])
def test_nf4_into_a_bf16_parameter_is_the_definition_rounded_to_bf16(shape):
    weight = torch.randn(shape)
    packed, absmax = quantize_nf4(weight)
    in_float32 = dequantize_nf4(packed, absmax, shape, out=torch.empty(shape))
    into = torch.full(shape, float("nan"), dtype=torch.bfloat16)
    assert dequantize_nf4(packed, absmax, shape, out=into) is into
    assert torch.allclose(into.float(), in_float32, rtol=2**-8, atol=0)
