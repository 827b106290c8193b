"""detect, models, setup, and hub ids resolved from a local Hugging Face cache built here."""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from specchat.cli.app import app

runner = CliRunner()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_dirs):
    """A Hugging Face cache holding tiny-org/tiny-target, laid out as huggingface_hub writes it."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-cache"
    repo = cache / "models--tiny-org--tiny-target"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    shutil.copytree(tiny_dirs["target"], snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_detect_json_has_every_fact_and_a_recommendation(tmp_path):
    result = runner.invoke(app, ["detect", "--json", "--store", str(tmp_path / "stores")])
    assert result.exit_code == 0, result.stderr
    facts = json.loads(result.stdout)
    assert {"cpu", "ram_total", "ram_available", "gpus", "store_dir", "disk_free", "disk_read_gbps", "disk_direct_io", "recommendation"} <= set(facts)
    assert {"name", "cores", "threads", "vector_extensions", "fp32_gflops", "bf16_gflops", "compute_dtype"} <= set(facts["cpu"])
    assert facts["cpu"]["compute_dtype"] == "float32" and facts["cpu"]["bf16_gflops"] is None  # (tests see no bf16 flags)
    assert facts["disk_read_gbps"] > 0 and facts["ram_total"] >= facts["ram_available"] > 0
    assert set(facts["recommendation"]) == {"target", "draft", "quant", "dtype", "offload", "budget"}
    assert all(item["reason"] for item in facts["recommendation"].values())
    assert not list((tmp_path / "stores").glob(".specchat-probe-*"))  # the probe file is gone
    assert facts["calibrated_budget"] == []  # nothing calibrated in this fresh config dir


def test_detect_on_a_cpu_with_bf16_units_recommends_bfloat16_and_fits_16bit_sizes(tmp_path, monkeypatch):
    from specchat.app import hardware
    from specchat.sources.registry import load_registry

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t: fpu avx2 avx512f amx_bf16 amx_tile\n")
    monkeypatch.setattr("specchat.common.system.CPUINFO", cpuinfo)
    monkeypatch.setattr(hardware, "matmul_flops", lambda dtype=torch.float32, tokens=256: 400e9 if dtype == torch.bfloat16 else 100e9)
    result = runner.invoke(app, ["detect", "--store", str(tmp_path / "stores")])
    assert result.exit_code == 0, result.stderr
    assert "matrix products: float32 100 GFLOP/s, bfloat16 400; compute bfloat16: the CPU has amx_bf16" in result.stdout
    assert "(400 vs 100 GFLOP/s at 256 rows)" in result.stdout
    entry = load_registry()["demo-1.5b"]
    room = {"gpus": [], "ram_available": int(entry.bytes_at(16) * 1.5), "disk_free": 10**12}
    assert hardware.fit(entry, room | {"cpu": {"compute_dtype": "bfloat16"}}) == "ram"
    assert hardware.fit(entry, room | {"cpu": {"compute_dtype": "float32"}}) == "ssd"  # 32-bit weights do not fit


def test_models_json_lists_the_demo_pair_as_present():
    result = runner.invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    demo = rows["demo-1.5b"]
    assert demo["present"] is True
    assert demo["drafts"] == [{"name": "demo-0.5b", "params_b": 0.49, "present": True}]
    assert demo["self_draft"] == {"name": "self:int4", "bytes": pytest.approx(1.54e9 * 0.75)}  # 4 bits + scales
    assert demo["bytes_16bit"] == pytest.approx(3.08e9) and demo["bytes_4bit"] == pytest.approx(0.77e9)
    assert {"llama-3.3-70b", "qwen2.5-72b", "llama-2-70b-chat", "mixtral-8x7b", "qwen2.5-coder-32b"} <= set(rows)
    assert rows["qwen2.5-72b"]["fits"] in ("ssd", "no")


def test_a_hub_id_resolves_from_the_local_cache(hub_cache, tiny_dirs):
    direct = runner.invoke(app, ["run", "--model", str(tiny_dirs["target"]), "--draft", "none", "--max-new-tokens", "6", "the sea"])
    via_hub = runner.invoke(app, ["run", "--model", "tiny-org/tiny-target", "--draft", "none", "--max-new-tokens", "6", "the sea"])
    assert via_hub.exit_code == 0, via_hub.stderr
    assert via_hub.stdout == direct.stdout


def test_a_hub_id_missing_from_the_cache_says_to_run_setup(hub_cache):
    result = runner.invoke(app, ["run", "--model", "tiny-org/absent", "--draft", "none", "x"])
    assert result.exit_code != 0
    assert result.stderr.strip() == (
        "error: tiny-org/absent is not in the local Hugging Face cache; run `specchat setup tiny-org/absent` to download it"
    )


def test_setup_builds_the_store_writes_the_config_and_is_idempotent(tiny_dirs, tmp_path):
    store = tmp_path / "stores"
    args = ["setup", str(tiny_dirs["target"]), "--draft", str(tiny_dirs["draft"]), "--offload", "ssd", "--store", str(store), "--yes"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.stderr
    assert "layer store ready" in first.stderr
    assert "measuring pass times for --budget auto" in first.stderr  # setup calibrates the cost model
    assert "--budget auto starts at K=" in first.stderr
    built = {p.name: p.stat().st_mtime_ns for p in next(store.iterdir()).iterdir()}
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.stderr
    assert {p.name: p.stat().st_mtime_ns for p in next(store.iterdir()).iterdir()} == built
    result = runner.invoke(app, ["run", "--store", str(store), "--max-new-tokens", "5", "--json", "the sea"])
    assert result.exit_code == 0, result.stderr
    assert "offload ssd: --offload ssd" in result.stderr  # the offload written by setup applies
    assert json.loads(result.stdout)["stats"]["new_tokens"] == 5
    # detect shows the budget `auto` starts at, from setup's calibration
    detected = runner.invoke(app, ["detect", "--store", str(store)])
    assert detected.exit_code == 0, detected.stderr
    assert "--budget auto for " in detected.stdout and "offload=ssd" in detected.stdout
    assert "starts at K=" in detected.stdout and "tok/pass" in detected.stdout


def test_setup_with_4bit_builds_an_nf4_store_and_writes_the_quant(tiny_dirs, tmp_path):
    import tomllib

    from specchat.common.paths import config_file

    store = tmp_path / "stores"
    args = ["setup", str(tiny_dirs["target"]), "--draft", "none", "--quant", "4bit", "--offload", "ssd", "--store", str(store),
            "--ram-budget", "1KB", "--yes"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert [p.name.endswith("-nf4") for p in store.iterdir()] == [True]
    written = tomllib.loads(config_file().read_text())
    assert (written["quant"], written["ram_budget"]) == ("4bit", 1000)
    run = runner.invoke(app, ["run", "--store", str(store), "--max-new-tokens", "4", "the sea"])
    assert run.exit_code == 0, run.stderr
    assert "4-bit NF4" in run.stderr


def test_setup_of_an_unknown_model_fails_cleanly():
    result = runner.invoke(app, ["setup", "no-such-model", "--yes"])
    assert result.exit_code != 0
    assert result.stderr.startswith("error: unknown model 'no-such-model'")


def test_write_config_keeps_other_keys_and_escapes_strings(tmp_path):
    import tomllib

    from specchat.app.setup import write_config

    path = tmp_path / "config.toml"
    path.write_text("temperature = 0.6\n")
    write_config(path, {"model": 'C:\\models\\"odd"', "draft": "none"})
    assert tomllib.loads(path.read_text()) == {"temperature": 0.6, "model": 'C:\\models\\"odd"', "draft": "none"}


@pytest.fixture
def paired_registry(tmp_path, monkeypatch, tiny_dirs):
    """A hub cache with a target, a mismatched draft and a good one; a registry pairing them (plus one not downloaded)."""
    import huggingface_hub.constants as constants

    import specchat.app.loader
    from specchat.sources.registry import load_registry

    cache = tmp_path / "hf-cache"
    for name, source in (("tiny-target", "target"), ("tiny-alien", "alien"), ("tiny-draft", "draft")):
        repo = cache / f"models--tiny-org--{name}"
        shutil.copytree(tiny_dirs[source], repo / "snapshots" / "0123456789abcdef")
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    toml = tmp_path / "models.toml"
    toml.write_text(
        '[models.tiny-target]\nrole = "target"\nfamily = "tiny"\nparams_b = 0.001\nhub = "tiny-org/tiny-target"\n'
        'drafts = ["tiny-alien", "tiny-absent", "tiny-draft"]\n'
        '[models.tiny-alien]\nrole = "draft"\nfamily = "tiny"\nparams_b = 0.001\nhub = "tiny-org/tiny-alien"\n'
        '[models.tiny-absent]\nrole = "draft"\nfamily = "tiny"\nparams_b = 0.001\nhub = "tiny-org/tiny-absent"\n'
        '[models.tiny-draft]\nrole = "draft"\nfamily = "tiny"\nparams_b = 0.001\nhub = "tiny-org/tiny-draft"\n'
    )
    registry = load_registry(toml)
    monkeypatch.setattr(specchat.app.loader, "load_registry", lambda: registry)
    return registry


def test_draft_auto_skips_a_mismatched_tokenizer_and_a_missing_draft(paired_registry):
    args = ["run", "--model", "tiny-target", "--draft", "auto", "--dtype", "bfloat16", "--budget", "4", "--max-new-tokens", "5"]
    result = runner.invoke(app, args + ["the sea"])
    assert result.exit_code == 0, result.stderr
    line = next(line for line in result.stderr.splitlines() if line.startswith("draft "))
    assert line.startswith("draft tiny-draft: the first registered draft of tiny-target that is here, shares its tokenizer and fits")
    assert "tiny-alien: draft tiny-alien does not share the target's tokenizer" in line
    assert "tiny-absent:" in line


@pytest.mark.parametrize("offload, dtype, why", [
    ("ssd", "float32", "the target streams 2 of its 2 layers from the disk every pass"),
    ("ssd", "bfloat16", "the target streams 2 of its 2 layers from the disk every pass"),
    ("none", "float32", "the target computes in float32 here, where a pass over a tree costs twice a one-token pass"),
    ("none", "bfloat16", None),  # resident in 16-bit: the sibling
])
def test_draft_auto_takes_the_self_draft_where_the_target_streams_or_computes_in_float32(
    paired_registry, tmp_path, offload, dtype, why
):
    args = ["run", "--model", "tiny-target", "--draft", "auto", "--budget", "4", "--max-new-tokens", "5", "--json",
            "--offload", offload, "--dtype", dtype, "--store", str(tmp_path / "stores"), "the sea"]
    if offload == "ssd":
        args += ["--ram-budget", "1000"]  # no layer stays resident
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    line = next(line for line in result.stderr.splitlines() if line.startswith("draft "))
    if why is None:
        assert line.startswith("draft tiny-draft: the first registered draft")
        assert json.loads(result.stdout)["stats"]["draft"]["name"] == "tiny-draft"
    else:
        assert line.startswith(f"draft self:int4: {why}, so the draft that agrees with it most pays")
        assert line.endswith("rather than tiny-draft")
        assert json.loads(result.stdout)["stats"]["draft"]["name"] == "self:int4"


@pytest.mark.parametrize("offload, dtype, faster", [
    ("ssd", "float32", "tiny-draft"), ("none", "float32", "tiny-draft"), ("none", "bfloat16", "self:int4"),
])
def test_draft_auto_takes_the_draft_measured_faster_once_both_ran_in_these_settings(
    paired_registry, tmp_path, offload, dtype, faster
):
    """Against the rule in each regime: measured speeds, once both drafts have some, decide."""
    from specchat.app.draftspeed import speed_file

    args = ["run", "--model", "tiny-target", "--budget", "4", "--max-new-tokens", "5", "--json",
            "--offload", offload, "--dtype", dtype, "--store", str(tmp_path / "stores"), "the sea"]
    if offload == "ssd":
        args += ["--ram-budget", "1000"]
    for draft in ("tiny-draft", "self:int4"):
        result = runner.invoke(app, args + ["--draft", draft])
        assert result.exit_code == 0, result.stderr
    speeds = json.loads(speed_file().read_text())
    assert sorted(key.split(" ")[1] for key in speeds) == ["draft=self:int4", "draft=tiny-draft"]
    assert all(entry["tokens"] > 0 and entry["seconds"] > 0 for entry in speeds.values())
    for key in speeds:  # as if each had run longer: 100 tokens, the one named faster at twice the other's speed
        speeds[key] = {"tokens": 100, "seconds": 10.0 if f"draft={faster} " in key else 20.0}
    speed_file().write_text(json.dumps(speeds))
    result = runner.invoke(app, args + ["--draft", "auto"])
    assert result.exit_code == 0, result.stderr
    line = next(line for line in result.stderr.splitlines() if line.startswith("draft "))
    other = "self:int4" if faster == "tiny-draft" else "tiny-draft"
    assert line.startswith(f"draft {faster}: measured faster here in these settings than {other} (10.00 against 5.00 tok/s")
    assert json.loads(result.stdout)["stats"]["draft"]["name"] == faster


def test_draft_speeds_count_from_enough_tokens_decay_and_survive_a_damaged_file(tmp_path):
    from specchat.app.draftspeed import MIN_TOKENS, WINDOW_TOKENS, measured_speed, record_speed
    from specchat.engine.events import GenerationStats

    def reply(tokens, seconds, method="specexec"):
        return GenerationStats(method, 4, 10, tokens, 1, 1.0, 1.0, seconds + 1.0, 1.0, 0.0, seconds, 0, 0, "length")

    path = tmp_path / "speeds.json"
    record_speed(path, "k", reply(MIN_TOKENS - 1, 10.0))
    assert measured_speed(path, "k") is None  # too few tokens yet
    record_speed(path, "k", reply(1, 0.5))
    assert measured_speed(path, "k") == pytest.approx(MIN_TOKENS / 10.5)
    record_speed(path, "k", reply(100, 5.0, method="ar"))  # plain decoding is no draft's speed
    assert measured_speed(path, "k") == pytest.approx(MIN_TOKENS / 10.5)
    for _ in range(40):  # the machine got faster: the old replies fade
        record_speed(path, "k", reply(WINDOW_TOKENS // 8, WINDOW_TOKENS / 8 / 20.0))
    assert json.loads(path.read_text())["k"]["tokens"] == WINDOW_TOKENS
    assert measured_speed(path, "k") == pytest.approx(20.0, rel=0.01)
    path.write_text("{not json")
    assert measured_speed(path, "k") is None
    record_speed(path, "other", reply(MIN_TOKENS, 1.0))  # rewritten whole
    assert measured_speed(path, "other") == pytest.approx(MIN_TOKENS)


def test_draft_auto_takes_the_int4_copy_of_the_nf4_weights_for_a_streamed_4bit_target(paired_registry, tmp_path):
    args = ["run", "--model", "tiny-target", "--draft", "auto", "--budget", "4", "--max-new-tokens", "5", "--json",
            "--offload", "ssd", "--quant", "4bit", "--ram-budget", "1000", "--store", str(tmp_path / "stores"), "the sea"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    line = next(line for line in result.stderr.splitlines() if line.startswith("draft "))
    assert line.startswith("draft self:int4: the target streams 2 of its 2 layers from the disk every pass")
    assert "its own NF4 layers in int4" in line and line.endswith("rather than tiny-draft")
    assert json.loads(result.stdout)["stats"]["draft"]["name"] == "self:int4"
    assert any(path.name.endswith("-of-nf4") for path in (tmp_path / "stores").iterdir())


def test_draft_auto_refuses_drafts_that_do_not_fit(paired_registry, monkeypatch):
    import specchat.app.drafts

    monkeypatch.setattr(specchat.app.drafts, "room_beside_target", lambda *args: 1000)
    result = runner.invoke(app, ["run", "--model", "tiny-target", "--draft", "auto", "--max-new-tokens", "5", "the sea"])
    assert result.exit_code != 0 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no registered draft of tiny-target can be used:")
    assert "tiny-draft: needs 0.0 GB, 0.0 GB left beside the target" in last and "--draft none" in last


def test_a_second_setup_does_not_inherit_the_first_ones_placement(tiny_dirs, tmp_path):
    import tomllib

    from specchat.common.paths import config_file

    store = tmp_path / "stores"
    first = runner.invoke(app, ["setup", str(tiny_dirs["target"]), "--draft", "none", "--offload", "ssd",
                                "--ram-budget", "1KB", "--store", str(store), "--yes"])
    assert first.exit_code == 0, first.stderr
    written = tomllib.loads(config_file().read_text())
    assert (written["offload"], written["ram_budget"], written["store"]) == ("ssd", 1000, str(store))
    second = runner.invoke(app, ["setup", str(tiny_dirs["draft"]), "--draft", "none", "--offload", "ram", "--yes"])
    assert second.exit_code == 0, second.stderr
    assert "offload none: --offload ram" in second.stderr and "layer store ready" not in second.stderr
    written = tomllib.loads(config_file().read_text())
    assert written == {"model": str(tiny_dirs["draft"]), "draft": "none", "offload": "none", "quant": "16bit"}


@pytest.mark.parametrize(
    "vram_gb, ram_gb, disk_gb, offload",
    [
        (80, 16, 100, "none"),  # a 32B target in 16-bit (64 GB) fits an 80 GB GPU
        (24, 128, 100, "ram"),  # not the GPU, but RAM: layers wait in pinned RAM
        (24, 32, 1000, "ssd"),  # neither: streamed from the store
    ],
)
def test_recommendation_on_a_gpu_machine(vram_gb, ram_gb, disk_gb, offload):
    from specchat.app.hardware import recommend
    from specchat.sources.registry import load_registry

    registry = load_registry()
    registry = {n: e for n, e in registry.items() if e.params_b <= 33}  # the largest target here: a 32B
    gb = 10**9
    facts = {
        "cpu": {"fp32_gflops": 100.0},
        "ram_available": ram_gb * gb,
        "gpus": [{"vram_free": vram_gb * gb, "pinned_h2d_gbps": 25.0}],
        "disk_free": disk_gb * gb,
        "disk_read_gbps": 3.0,
    }
    advice = recommend(facts, registry)
    assert advice["offload"]["value"] == offload, advice
    assert advice["target"]["value"] in ("qwen2.5-32b", "qwen2.5-coder-32b")
    if offload != "none":  # a streamed target: a big tree, up to where compute catches up with the copy
        assert int(advice["budget"]["value"]) >= 256


@pytest.mark.parametrize("largest_b, ram_gb, draft", [(8, 24, "self:int4"), (8, 6, "qwen2.5-0.5b"), (73, 24, "qwen2.5-0.5b")])
def test_recommendation_on_a_cpu_names_the_self_draft_where_the_streamed_target_s_low_bit_copy_fits(largest_b, ram_gb, draft):
    from specchat.app.hardware import recommend
    from specchat.sources.registry import load_registry

    registry = {n: e for n, e in load_registry().items() if e.params_b <= largest_b}
    gb = 10**9
    facts = {"cpu": {"fp32_gflops": 100.0}, "ram_available": ram_gb * gb, "gpus": [], "disk_free": 1000 * gb, "disk_read_gbps": 2.0}
    advice = recommend(facts, registry)
    assert advice["offload"]["value"] == "ssd", advice
    assert advice["draft"]["value"] == draft, advice
    if draft == "self:int4":
        assert advice["draft"]["reason"].startswith("the target streams every pass, so its own layers in int4")


def test_models_table_names_every_way_a_target_can_run():
    import io

    from specchat.cli.views import models_table

    rows = [
        {"name": name, "params_b": 1.0, "bytes_16bit": 2e9, "bytes_4bit": 0.6e9, "present": False, "fits": fits, "drafts": []}
        for name, fits in (("a", "ram"), ("b", "pinned"), ("c", "ssd"), ("d", "no"))
    ]
    out = io.StringIO()
    models_table(rows, out)
    text = out.getvalue()
    assert all(phrase in text for phrase in ("in memory", "pinned RAM -> GPU", "streamed from SSD"))


COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def fnmatch_any(name, patterns):
    import fnmatch

    return any(fnmatch.fnmatch(name, p) for p in patterns)


def sharded_source(tiny_dirs):
    """The tiny target saved in two weight files with a shard index, as large hub models are."""
    from safetensors.torch import load_file, save_file

    directory = tiny_dirs["target"].parent / "target-sharded"
    if directory.exists():
        return directory
    directory.mkdir()
    for path in tiny_dirs["target"].iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, directory / path.name)
    tensors = load_file(tiny_dirs["target"] / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, shard_names in halves.items():
        save_file({n: tensors[n] for n in shard_names}, directory / shard, metadata={"format": "pt"})
    weight_map = {n: shard for shard, shard_names in halves.items() for n in shard_names}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def write_snapshot(hub_cache, repo_id, source, skip=()):
    """Lay out ``source`` as huggingface_hub >= 1 does after a download: the snapshot, the ref, and
    the repo's whole file list (README.md and .gitattributes too, which setup does not fetch)."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.name not in skip and not (snapshot / path.name).exists():
            shutil.copy(path, snapshot / path.name)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    try:
        from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache
    except ImportError:  # older clients keep no file list
        return snapshot
    listing = {p.name: TreeCacheEntry(size=p.stat().st_size, blob_id="0" * 40) for p in source.iterdir()}
    listing.update({name: TreeCacheEntry(size=10, blob_id="1" * 40) for name in ("README.md", ".gitattributes")})
    write_tree_cache(str(repo), COMMIT, listing)
    return snapshot


@pytest.fixture
def fake_hub(hub_cache, tiny_dirs, monkeypatch):
    """huggingface_hub.snapshot_download with the network replaced: a download writes the tiny
    target into the cache as the hub would; cache look-ups (local_files_only) stay the real ones."""
    import huggingface_hub

    real = huggingface_hub.snapshot_download
    calls = []

    def snapshot_download(repo_id, local_files_only=False, **kwargs):
        if local_files_only:
            return real(repo_id, local_files_only=True, **kwargs)
        calls.append((repo_id, kwargs))
        if repo_id == "tiny-org/gone":
            import importlib

            from huggingface_hub import errors

            http = importlib.import_module(errors.Response.__module__.split(".")[0])  # the HTTP client it uses
            url = f"https://huggingface.co/api/models/{repo_id}"
            response = http.Response(404, request=http.Request("GET", url))
            raise errors.HfHubHTTPError(f"404 Client Error: Repository Not Found for url: {url}", response=response)
        source = sharded_source(tiny_dirs) if repo_id == "tiny-org/sharded" else tiny_dirs["target"]
        snapshot = write_snapshot(hub_cache, repo_id, source)
        assert all(fnmatch_any(p.name, kwargs["allow_patterns"]) for p in snapshot.iterdir())
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_setup_downloads_a_hub_model_through_huggingface_hub_then_runs_it(fake_hub, tiny_dirs):
    result = runner.invoke(app, ["setup", "tiny-org/new-model", "--draft", "none", "--offload", "none", "--yes"])
    assert result.exit_code == 0, result.stderr
    assert "downloading tiny-org/new-model (resumes where it stopped)" in result.stderr
    [(repo_id, options)] = fake_hub
    assert repo_id == "tiny-org/new-model"
    assert "*.safetensors" in options["allow_patterns"] and not any(p.endswith((".bin", ".pt")) for p in options["allow_patterns"])
    again = runner.invoke(app, ["setup", "tiny-org/new-model", "--draft", "none", "--offload", "none", "--yes"])
    assert again.exit_code == 0 and len(fake_hub) == 1  # in the cache now: no second download
    ran = runner.invoke(app, ["run", "--max-new-tokens", "4", "the sea"])  # the configured model
    direct = runner.invoke(app, ["run", "--model", str(tiny_dirs["target"]), "--draft", "none", "--max-new-tokens", "4", "the sea"])
    assert ran.exit_code == 0, ran.stderr
    assert ran.stdout == direct.stdout


def test_a_failed_download_is_one_error_line(fake_hub):
    result = runner.invoke(app, ["setup", "tiny-org/gone", "--draft", "none", "--yes"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot download tiny-org/gone: 404 Client Error")
    assert "Traceback" not in result.stderr


def test_a_download_stopped_between_weight_files_is_never_taken_for_a_model_and_setup_resumes_it(fake_hub, hub_cache, tiny_dirs):
    source = sharded_source(tiny_dirs)
    last_shard = sorted(p.name for p in source.glob("*.safetensors"))[-1]
    write_snapshot(hub_cache, "tiny-org/sharded", source, skip=(last_shard,))  # Ctrl-C before the last file
    run = runner.invoke(app, ["run", "--model", "tiny-org/sharded", "--draft", "none", "--max-new-tokens", "4", "the sea"])
    assert run.exit_code == 2
    [line] = run.stderr.strip().splitlines()
    assert "partly downloaded" in line or "misses 1 of the 2 weight files" in line
    assert "specchat setup" in line
    setup = runner.invoke(app, ["setup", "tiny-org/sharded", "--draft", "none", "--offload", "none", "--yes"])
    assert setup.exit_code == 0, setup.stderr
    assert [repo for repo, _ in fake_hub] == ["tiny-org/sharded"]  # it resumed the download
    ran = runner.invoke(app, ["run", "--model", "tiny-org/sharded", "--draft", "none", "--max-new-tokens", "4", "the sea"])
    direct = runner.invoke(app, ["run", "--model", str(tiny_dirs["target"]), "--draft", "none", "--max-new-tokens", "4", "the sea"])
    assert ran.exit_code == 0, ran.stderr
    assert ran.stdout == direct.stdout


def test_a_directory_missing_a_listed_weight_file_is_one_error_line(tiny_dirs, tmp_path):
    source = sharded_source(tiny_dirs)
    partial = tmp_path / "partial"
    shutil.copytree(source, partial)
    sorted(partial.glob("*.safetensors"))[-1].unlink()
    result = runner.invoke(app, ["run", "--model", str(partial), "--draft", "none", "--max-new-tokens", "2", "x"])
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {partial} misses 1 of the 2 weight files its shard index lists")


def test_an_invalid_hub_id_is_one_error_line(hub_cache):
    result = runner.invoke(app, ["run", "--model", "a/b:c", "--draft", "none", "x"])
    assert result.exit_code == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: a/b:c is not a valid Hugging Face repo id (")
