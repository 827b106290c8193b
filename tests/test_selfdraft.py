"""The draft made from the target itself: shared tensors, low-bit layers, exact speculation."""

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from specchat.app.config import RunConfig
from specchat.app.loader import load_pipeline
from specchat.cli.app import app
from specchat.engine.autobudget.costmodel import PRIOR_BETA, SELF_DRAFT_PRIOR_BETA
from specchat.engine.config import GenerationConfig
from specchat.engine.engine import Engine
from specchat.speculation.agreement import SELF_DRAFT_RATE, GreedyAgreement
from specchat.model.kvcache import KVCache, SharedPrefixCache
from specchat.model.loading import load_resident
from specchat.model.selfdraft import build_self_draft, self_draft_bytes, self_draft_kind
from specchat.sources.facts import read_facts
from specchat.speculation.lookahead import Lookahead
from specchat.weights.lowbit import Int4Linear, Int8Linear, int4_group, int4_rounding, lowbit_bytes, quantize_layer, tune_int8
from tiny import CharTokenizer, TickingClock

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_target(tiny_dirs):
    return load_resident(tiny_dirs["target"]), read_facts(tiny_dirs["target"])


@pytest.mark.parametrize("spec, kind", [("self", "int4"), ("self:int8", "int8"), ("self:int4", "int4"), ("demo-0.5b", None), ("selfish", None)])
def test_self_draft_specs(spec, kind):
    assert self_draft_kind(spec) == kind


@pytest.mark.parametrize("spec", ["self:int3", "self:", "self:INT8"])
def test_a_self_draft_of_an_unknown_kind_is_refused(spec):
    if spec == "self:":  # an empty kind is the default one
        assert self_draft_kind(spec) == "int4"
        return
    with pytest.raises(ValueError, match="a self draft is one of self, self:int8, self:int4"):
        self_draft_kind(spec)


def test_int4_linear_multiplies_by_its_group_wise_rounding_of_the_weights():
    torch.manual_seed(0)
    linear = nn.Linear(128, 48)
    q_linear = Int4Linear.quantize(linear)
    q, scale, low = int4_rounding(linear.weight.detach().reshape(48, 4, 32))
    # What the kernel multiplies by: a float32 layer's scales and zeros, and its rows, in bf16.
    scale, zero = (t.bfloat16().float() for t in (scale, low + 8 * scale))
    dequantised = ((q - 8) * scale[..., None] + zero[..., None]).reshape(48, 128)
    x = torch.randn(5, 128)
    y = q_linear(x)
    assert y.dtype == torch.float32 and q_linear.scales_zeros.dtype == torch.bfloat16
    torch.testing.assert_close(y, x.bfloat16().float() @ dequantised.t() + linear.bias.detach(), rtol=1e-2, atol=1e-2)
    assert q_linear(x[None]).shape == (1, 5, 48)  # batch dims are kept


def test_int4_rounding_errs_no_more_than_round_to_nearest_in_any_group():
    torch.manual_seed(1)
    groups = torch.randn(64, 10, 32) * torch.rand(64, 10, 1)  # (rows, groups, g)
    q, scale, low = int4_rounding(groups)
    assert q.min() >= 0 and q.max() <= 15 and bool((q == q.round()).all())
    fitted_err = ((low[..., None] + q * scale[..., None] - groups) ** 2).sum(-1)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    step = (hi - lo) / 15
    nearest_err = ((lo + torch.round((groups - lo) / step) * step - groups) ** 2).sum(-1)
    assert bool((fitted_err <= nearest_err * (1 + 1e-5)).all())
    assert fitted_err.sum() < 0.95 * nearest_err.sum()  # and less overall


def test_weights_already_on_a_4bit_grid_come_back_on_it():
    torch.manual_seed(2)
    levels = torch.randint(0, 12, (16, 8, 32)).float()  # a Q4_K-like block: min + q scale, not every level used
    levels[..., 0], levels[..., 1] = 0, torch.randint(12, 16, (16, 8)).float()  # its values span 12-15 steps
    scale, low = torch.rand(16, 8, 1) * 0.01 + 1e-3, torch.randn(16, 8, 1) * 0.05
    grid = low + levels * scale
    q, fitted_scale, fitted_low = int4_rounding(grid)
    torch.testing.assert_close(fitted_low[..., None] + q * fitted_scale[..., None], grid, rtol=0, atol=1e-5)


@pytest.mark.parametrize("width, group", [(64, 32), (128, 32), (96, 32), (32, 32)])
def test_int4_groups_divide_the_input_width(width, group):
    assert int4_group(width) == group


def test_int4_refuses_a_width_it_cannot_group():
    with pytest.raises(ValueError, match="multiple of 32"):
        int4_group(40)


def test_an_unknown_low_bit_kind_is_refused():
    with pytest.raises(ValueError, match="low-bit kind must be one of int8, int4"):
        quantize_layer(nn.Sequential(nn.Linear(32, 32)), "int2")


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_the_self_draft_shares_the_targets_embeddings_and_head_and_holds_low_bit_layers(tiny_target, kind):
    target, facts = tiny_target
    draft = build_self_draft(target.lm, facts, kind)
    assert draft.embed_tokens is target.lm.embed_tokens and draft.lm_head is target.lm.lm_head and draft.norm is target.lm.norm
    layers = list(draft.layer_source.layers())
    assert len(layers) == facts.num_layers
    assert not any(type(m) is nn.Linear for layer in layers for m in layer.modules())  # every product is low-bit
    held = sum(lowbit_bytes(layer) for layer in layers)
    assert held < facts.layer_bytes(torch.float32) * facts.num_layers / 2  # a quarter or an eighth, plus scales
    assert self_draft_bytes(facts, kind, target.lm.dtype) <= held * 1.5  # the pre-flight's estimate is of the right size
    assert draft.new_cache() is not target.lm.new_cache()


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_the_self_draft_agrees_with_the_target(tiny_target, kind):
    """A rounded copy of the target picks the target's greedy token almost everywhere."""
    target, facts = tiny_target
    draft = build_self_draft(target.lm, facts, kind)
    ids = torch.arange(1, 60)
    visible = torch.ones(59, 59, dtype=torch.bool).tril()
    ours = target.lm.forward(ids, torch.arange(59), visible, target.lm.new_cache()).argmax(-1)
    theirs = draft.forward(ids, torch.arange(59), visible, draft.new_cache()).argmax(-1)
    assert (ours == theirs).float().mean() >= 0.9


@pytest.mark.parametrize("method", ["specexec", "specinfer"])
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_speculation_with_the_self_draft_is_exact_and_accepts_as_the_target_itself_would(tiny_target, tiny_dirs, kind, method):
    """Greedy output == plain decoding; tokens per pass close to the target drafting for itself
    (every draft token accepted) and well above an unrelated draft's."""
    target, facts = tiny_target
    prompt, config = [3, 9, 27, 14], GenerationConfig(method=method, budget=16, max_new_tokens=48)
    plain = list(Engine(target.lm, None, CharTokenizer(), []).generate(prompt, GenerationConfig(method="ar", max_new_tokens=48)))
    per_pass = {}
    for name, draft in [
        ("self", build_self_draft(target.lm, facts, kind)), ("target", target.lm), ("other", load_resident(tiny_dirs["draft"]).lm)
    ]:
        done = list(Engine(target.lm, draft, CharTokenizer(), [], clock=TickingClock()).generate(prompt, config))[-1]
        assert done.token_ids == plain[-1].token_ids
        per_pass[name] = done.stats.tokens_per_pass
    # With every span 0.1 s the stop rule keeps trees small (a draft step costs a target pass),
    # so int4's rounding shows: 3.43 tokens a pass against the target's own 4.0 here.
    assert per_pass["self"] >= 0.8 * per_pass["target"] and per_pass["self"] > 2 * per_pass["other"], per_pass


def test_run_with_the_self_draft_prints_the_greedy_reply(tiny_dirs, tmp_path):
    args = ["run", "--model", str(tiny_dirs["target"]), "--max-new-tokens", "16", "--budget", "8", "--json",
            "--store", str(tmp_path / "stores")]
    plain = runner.invoke(app, [*args, "--draft", "none", "a calm tide"])
    ours = runner.invoke(app, [*args, "--draft", "self:int4", "a calm tide"])
    assert plain.exit_code == 0 and ours.exit_code == 0, ours.stderr
    assert json.loads(ours.stdout)["tokens"] == json.loads(plain.stdout)["tokens"]
    assert json.loads(ours.stdout)["stats"]["draft"] == {"name": "self:int4", "bits": 4, "bytes": self_draft_bytes(read_facts(tiny_dirs["target"]), "int4", torch.float32)}
    assert json.loads(plain.stdout)["stats"]["draft"] is None
    assert "draft self:int4: the target's own layers in int4" in ours.stderr
    assert "building the self draft (int4): 2/2 layers" in ours.stderr
    assert "self draft's head: the target's head" in ours.stderr  # a 64-token head is never copied


def test_int8_linear_is_the_row_wise_rounding_of_the_weights():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    q = Int8Linear.quantize(linear)
    w = linear.weight.detach()
    scale = w.abs().amax(1, keepdim=True) / 127
    x = torch.randn(3, 96)
    # The kernel takes a float32 layer's rows and scales in bf16 (lowbit.kernel_dtype).
    want = x.bfloat16().float() @ (torch.round(w / scale) * scale.bfloat16().float()).t() + linear.bias.detach()
    assert q(x).dtype == torch.float32 and q.scales.dtype == torch.bfloat16
    torch.testing.assert_close(q(x), want, rtol=1e-2, atol=1e-2)
    half = Int8Linear.quantize(linear.to(torch.bfloat16))
    assert half(x.bfloat16()).dtype == torch.bfloat16 and half.scales.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_widened_int8_product_equals_the_int8_kernel(dtype):
    torch.manual_seed(0)
    q = Int8Linear.quantize(nn.Linear(96, 40).to(dtype))
    x = torch.randn(20, 96).to(dtype)
    narrow = q(x)
    q.wide_rows = 16
    assert q.wide_rows <= x.shape[0]
    # The int8 kernel takes its rows in bf16 whatever the layer's dtype (lowbit.kernel_dtype).
    torch.testing.assert_close(q(x), narrow, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(q(x[:3]), narrow[:3])  # below wide_rows: the int8 kernel itself


def test_tune_int8_sets_one_crossover_on_every_int8_linear():
    torch.manual_seed(0)
    layers = [quantize_layer(nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 64)), "int8") for _ in range(2)]
    ticks = iter(range(10**6))
    crossover = tune_int8(layers, torch.float32, clock=lambda: next(ticks))  # every call "takes" 1 tick: never faster
    assert crossover == Int8Linear.wide_rows == 1 << 30
    crossover = tune_int8(layers, torch.float32)
    assert {m.wide_rows for layer in layers for m in layer if isinstance(m, Int8Linear)} == {crossover}


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_low_bit_layer_saves_and_loads_through_its_state_dict(kind):
    torch.manual_seed(0)
    layer = quantize_layer(nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32)), kind)
    with torch.device("meta"):
        shell = nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32))
    shell = quantize_layer(shell, kind, shell=True)
    shell.load_state_dict(layer.state_dict(), strict=True, assign=True)
    x = torch.randn(3, 64)
    torch.testing.assert_close(shell(x), layer(x))


def test_draft_auto_for_a_target_with_no_registered_draft_uses_the_self_draft(tiny_dirs, tmp_path):
    args = ["run", "--model", str(tiny_dirs["target"]), "--max-new-tokens", "12", "--budget", "8", "--json",
            "--store", str(tmp_path / "stores"), "the sea"]
    ours = runner.invoke(app, args)
    plain = runner.invoke(app, [*args, "--draft", "none"])
    assert ours.exit_code == 0, ours.stderr
    assert json.loads(ours.stdout)["tokens"] == json.loads(plain.stdout)["tokens"]
    assert f"draft self:int4: no registered draft pairs with {tiny_dirs['target']}, so its own layers in int4" in ours.stderr


def test_draft_auto_for_an_unpaired_target_without_room_for_a_self_draft_says_so(tiny_dirs, monkeypatch):
    import specchat.app.drafts

    monkeypatch.setattr(specchat.app.drafts, "room_beside_target", lambda *args: 1000)
    result = runner.invoke(app, ["run", "--model", str(tiny_dirs["target"]), "--max-new-tokens", "5", "the sea"])
    assert result.exit_code != 0 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: no registered draft pairs with {tiny_dirs['target']}, and a self draft needs 0.0 GB")
    assert "--draft none" in last


@pytest.mark.parametrize("method", ["specexec", "specinfer"])
def test_the_self_draft_reads_the_targets_cache_and_never_prefills(tiny_target, method):
    """With the shared cache the draft's forwards are the tree's (the root and its nodes), never
    the prompt; the reply stays the plain greedy one, and a second turn reuses both caches."""
    target, facts = tiny_target
    draft = build_self_draft(target.lm, facts, "int8")
    sizes = []
    forward = draft.forward

    def spy(input_ids, positions, visible, cache, logit_rows=None):
        sizes.append(input_ids.shape[0])
        assert isinstance(cache, SharedPrefixCache)
        return forward(input_ids, positions, visible, cache, logit_rows)

    draft.forward = spy
    prompt = list(range(3, 43))  # 40 tokens
    config = GenerationConfig(method=method, budget=8, max_new_tokens=24)
    plain_engine = Engine(target.lm, None, CharTokenizer(), [])
    engine = Engine(target.lm, draft, CharTokenizer(), [])
    for turn in range(2):
        plain = list(plain_engine.generate(prompt, GenerationConfig(method="ar", max_new_tokens=24)))[-1]
        done = list(engine.generate(prompt, config))[-1]
        assert done.token_ids == plain.token_ids
        assert max(sizes) <= 8 and engine.draft_cache.base is engine.target_cache
        prompt = prompt + list(done.token_ids) + [5, 6, 7]
    unshared = build_self_draft(target.lm, facts, "int8", shares_cache=False)
    assert isinstance(Engine(target.lm, unshared, CharTokenizer(), []).draft_cache, KVCache)


def _self_run(tiny_dirs, store, *extra):
    args = ["run", "--model", str(tiny_dirs["target"]), "--draft", "self:int8", "--store", str(store),
            "--max-new-tokens", "10", "--budget", "8", "--json", *extra, "the sea"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout)["tokens"], result.stderr


def test_the_self_draft_is_kept_beside_the_stores_and_loaded_next_time(tiny_dirs, tmp_path):
    first, built = _self_run(tiny_dirs, tmp_path / "stores")
    assert "building the self draft (int8): 2/2 layers" in built
    [copy] = (tmp_path / "stores").iterdir()
    assert copy.name.endswith("-self-int8") and (copy / "manifest.json").is_file()
    assert sorted(p.name for p in copy.iterdir()) == [".lock", "layer_000.safetensors", "layer_001.safetensors", "manifest.json"]
    second, loaded = _self_run(tiny_dirs, tmp_path / "stores")
    assert second == first and "building the self draft" not in loaded and f"self draft (int8) loaded from {copy}" in loaded


def test_a_damaged_self_draft_copy_is_rebuilt_never_used(tiny_dirs, tmp_path):
    first, _ = _self_run(tiny_dirs, tmp_path / "stores")
    [copy] = (tmp_path / "stores").iterdir()
    layer = copy / "layer_001.safetensors"
    data = bytearray(layer.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the weights
    layer.write_bytes(bytes(data))
    again, stderr = _self_run(tiny_dirs, tmp_path / "stores")
    assert again == first
    assert f"the saved self draft in {copy} cannot be used ({layer} is damaged (checksum mismatch)); building it again" in stderr
    _, clean = _self_run(tiny_dirs, tmp_path / "stores")
    assert "loaded from" in clean  # the rebuilt copy checks out


def _interrupt_build(copy, contents=None) -> int:
    """Make a finished copy look killed while writing its layer 1 (optionally a build of other
    ``contents``); returns layer 0's mtime."""
    manifest = json.loads((copy / "manifest.json").read_text())
    record = {key: manifest[key] for key in ("format", "torch", "contents", "source_files")}
    (copy / "building.json").write_text(json.dumps(record | ({"contents": contents} if contents else {})))
    (copy / "manifest.json").unlink()  # as if killed before the manifest ...
    (copy / "layer_001.safetensors").rename(copy / "layer_001.safetensors.partial")  # ... while writing layer 1
    return (copy / "layer_000.safetensors").stat().st_mtime_ns


def test_an_interrupted_self_draft_build_resumes_with_the_layers_it_wrote(tiny_dirs, tmp_path):
    first, _ = _self_run(tiny_dirs, tmp_path / "stores")
    [copy] = (tmp_path / "stores").iterdir()
    kept = _interrupt_build(copy)
    again, stderr = _self_run(tiny_dirs, tmp_path / "stores")
    assert again == first and "building the self draft (int8): 2/2 layers" in stderr
    assert (copy / "layer_000.safetensors").stat().st_mtime_ns == kept  # not rewritten
    assert not list(copy.glob("*.partial")) and (copy / "manifest.json").is_file()


def test_a_half_built_copy_of_other_contents_is_not_resumed(tiny_dirs, tmp_path):
    first, _ = _self_run(tiny_dirs, tmp_path / "stores")
    [copy] = (tmp_path / "stores").iterdir()
    kept = _interrupt_build(copy, contents={"kind": "int8", "dtype": "torch.float16"})  # another compute dtype's build
    again, stderr = _self_run(tiny_dirs, tmp_path / "stores")
    assert again == first and "building the self draft (int8): 2/2 layers" in stderr
    assert (copy / "layer_000.safetensors").stat().st_mtime_ns != kept  # rebuilt, not mixed with the other build's layer


def test_a_self_draft_that_cannot_be_kept_is_built_and_used_anyway(tiny_dirs, tmp_path):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("x")
    tokens, stderr = _self_run(tiny_dirs, not_a_directory)
    plain = runner.invoke(app, ["run", "--model", str(tiny_dirs["target"]), "--draft", "none", "--max-new-tokens", "10", "--json", "the sea"])
    assert tokens == json.loads(plain.stdout)["tokens"]
    assert "cannot keep the self draft in" in stderr and "it is built again each run" in stderr


def test_setup_with_the_self_draft_builds_and_keeps_it_and_run_loads_it(tiny_dirs, tmp_path):
    import tomllib

    from specchat.common.paths import config_file

    store = tmp_path / "stores"
    result = runner.invoke(app, ["setup", str(tiny_dirs["target"]), "--draft", "self", "--store", str(store), "--yes"])
    assert result.exit_code == 0, result.stderr
    assert "building the self draft (int4): 2/2 layers" in result.stderr
    assert "measuring pass times for --budget auto" in result.stderr  # calibrated with the self draft
    assert tomllib.loads(config_file().read_text())["draft"] == "self"
    run = runner.invoke(app, ["run", "--max-new-tokens", "5", "--json", "the sea"])
    assert run.exit_code == 0, run.stderr
    assert "self draft (int4) loaded from" in run.stderr and "building the self draft" not in run.stderr
    assert json.loads(run.stdout)["stats"]["draft"]["name"] == "self:int4"


def test_setup_of_a_target_with_no_registered_draft_pairs_it_with_itself(tiny_dirs, tmp_path):
    import tomllib

    from specchat.common.paths import config_file

    result = runner.invoke(app, ["setup", str(tiny_dirs["target"]), "--store", str(tmp_path / "stores"), "--yes"])
    assert result.exit_code == 0, result.stderr
    assert "building the self draft (int4)" in result.stderr
    assert tomllib.loads(config_file().read_text())["draft"] == "auto"  # run pairs it the same way


@pytest.mark.parametrize("draft, offload", [("self:int8", "ssd"), ("self:int8", "none"), ("sibling", "ssd")])
def test_the_loaded_engine_looks_ahead_where_the_target_streams_and_expects_deep_trees_from_a_self_draft(tiny_dirs, tmp_path, draft, offload):
    """Two facts the loader decides once: the lookahead (a self draft beside a target streamed on
    the CPU) and the budget tuner's first guess of acceptance (high for a draft made from the target)."""
    config = RunConfig(model=str(tiny_dirs["target"]), draft=str(tiny_dirs["draft"]) if draft == "sibling" else draft,
                       offload=offload, store=tmp_path / "stores", ram_budget=1 if offload == "ssd" else None, budget=4, max_new_tokens=12)
    pipeline = load_pipeline(config)
    assert isinstance(pipeline.engine.lookahead, Lookahead) == (offload == "ssd" and draft.startswith("self"))
    assert pipeline.engine.costs.prior_beta == (SELF_DRAFT_PRIOR_BETA if draft.startswith("self") else PRIOR_BETA)
    unmeasured = GreedyAgreement(SELF_DRAFT_RATE if draft.startswith("self") else None)
    assert torch.equal(pipeline.engine.agreement.hits, unmeasured.hits)  # a self draft's first trees go deep
    ids = pipeline.encode_chat([{"role": "user", "content": "the sea"}])
    done = list(pipeline.generate(ids, config.generation()))[-1]
    plain_engine = Engine(pipeline.engine.target, None, pipeline.tokenizer, pipeline.engine.eos_token_ids)
    plain = list(plain_engine.generate(ids, GenerationConfig(method="ar", max_new_tokens=12)))[-1]
    assert done.token_ids == plain.token_ids


def test_a_4bit_targets_self_draft_rounds_the_nf4_weights_and_is_kept_apart(tiny_target, tiny_dirs, tmp_path):
    """For an NF4 target the copy is the int8 rounding of the weights as the 4-bit store holds
    them (the model that target computes), in a directory of its own; the 16-bit copy's is another."""
    from safetensors import safe_open

    from specchat.model.selfdraft import self_draft_dir
    from specchat.weights.quant4 import roundtrip_nf4

    target, facts = tiny_target
    of_nf4 = build_self_draft(target.lm, facts, "int8", weights="4bit", cache_dir=tmp_path / "nf4")
    of_16bit = build_self_draft(target.lm, facts, "int8")
    name = "model.layers.1.mlp.down_proj.weight"
    [file] = [f for f in sorted(tiny_dirs["target"].glob("*.safetensors")) if name in safe_open(str(f), "pt").keys()]
    weight = safe_open(str(file), "pt").get_tensor(name)
    for copy, source in ((of_nf4, roundtrip_nf4(weight)), (of_16bit, weight)):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        linear.weight = nn.Parameter(source.to(target.lm.dtype), requires_grad=False)
        want = Int8Linear.quantize(linear)
        got = list(copy.layer_source.layers())[1].mlp.down_proj
        assert torch.equal(got.weight_int8, want.weight_int8) and torch.equal(got.scales, want.scales)
    assert not torch.equal(list(of_nf4.layer_source.layers())[1].mlp.down_proj.weight_int8,
                           list(of_16bit.layer_source.layers())[1].mlp.down_proj.weight_int8)
    store_root = tmp_path / "stores"
    assert self_draft_dir(store_root, facts, "int8", "4bit") != self_draft_dir(store_root, facts, "int8")
    assert self_draft_dir(store_root, facts, "int8", "4bit").name.endswith("-self-int8-of-nf4")
    assert json.loads((tmp_path / "nf4" / "manifest.json").read_text())["contents"]["weights"] == "nf4"


def test_with_a_4bit_target_the_nf4_copy_agrees_more_and_speculation_stays_exact(tiny_dirs, tmp_path):
    """Loaded as `run --quant 4bit --draft self` does: the draft copies the NF4 weights, so it takes
    the NF4 target's greedy token at least as often as a copy of the 16-bit checkpoint; greedy
    SpecExec equals the NF4 target's own greedy reply."""
    config = RunConfig(model=str(tiny_dirs["target"]), draft="self:int8", quant="4bit", offload="ssd", ram_budget=1,
                       store=tmp_path / "stores", budget=8, max_new_tokens=24)
    pipeline = load_pipeline(config)
    target, draft = pipeline.engine.target, pipeline.engine.draft
    assert any(p.name.endswith("-self-int8-of-nf4") for p in (tmp_path / "stores").iterdir())
    of_16bit = build_self_draft(target, read_facts(tiny_dirs["target"]), "int8")
    ids = torch.arange(1, 60)
    visible = torch.ones(59, 59, dtype=torch.bool).tril()
    ours = target.forward(ids, torch.arange(59), visible, target.new_cache())  # (59, V)
    agree = {
        name: (model.forward(ids, torch.arange(59), visible, model.new_cache()).argmax(-1) == ours.argmax(-1)).float().mean()
        for name, model in (("nf4", draft), ("16bit", of_16bit))
    }
    assert agree["nf4"] >= agree["16bit"] and agree["nf4"] >= 0.9, agree
    prompt = pipeline.encode_chat([{"role": "user", "content": "the sea"}])
    done = list(pipeline.generate(prompt, config.generation()))[-1]
    plain = list(Engine(target, None, pipeline.tokenizer, pipeline.engine.eos_token_ids).generate(
        prompt, GenerationConfig(method="ar", max_new_tokens=24)))[-1]
    assert done.token_ids == plain.token_ids
