"""Integration on the embedded demo pair (Qwen2.5-Coder 1.5B target, 0.5B draft), RAM-resident float32.

The first run assembles, verifies and converts the models (a few minutes); later runs reuse
the converted copies in the specchat cache directory.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from specchat.app.config import RunConfig
from specchat.engine.config import GenerationConfig
from specchat.app.loader import load_pipeline

pytestmark = pytest.mark.demo
MT_BENCH = Path(__file__).resolve().parents[1] / "specchat" / "data" / "mt_bench.jsonl"


@pytest.fixture(scope="module")
def demo():
    config = RunConfig(model="demo", draft="demo-0.5b", dtype="float32")  # the pair, on the exact float32 path
    return load_pipeline(config, progress=lambda message: None)


def first_turns(n: int) -> list[str]:
    lines = MT_BENCH.read_text().splitlines()
    return [json.loads(line)["turns"][0] for line in lines[:n]]


def reply_ids(pipeline, prompt_ids, **config) -> tuple[int, ...]:
    events = list(pipeline.engine.generate(prompt_ids, GenerationConfig(**config)))
    return events[-1].token_ids, events[-1].stats


def test_demo_pair_shares_a_tokenizer_and_is_paired_in_the_registry(demo):
    from specchat.sources.registry import load_registry

    assert demo.target_name == "demo-1.5b" and demo.draft_name == "demo-0.5b"
    assert "demo-0.5b" in load_registry()["demo-1.5b"].drafts
    assert demo.target.tokenizer.get_vocab() == demo.draft.tokenizer.get_vocab()


@pytest.mark.parametrize("question", first_turns(2))
def test_greedy_specexec_equals_plain_greedy_on_mt_bench(demo, question):
    prompt_ids = demo.encode_chat([{"role": "user", "content": question}])
    plain, _ = reply_ids(demo, prompt_ids, method="ar", max_new_tokens=32)
    spec, stats = reply_ids(demo, prompt_ids, method="specexec", budget=16, max_new_tokens=32)
    assert spec == plain
    assert stats.tokens_per_pass > 1.5  # the demo draft really helps


def test_cli_answers_a_piped_prompt_on_the_demo_pair():
    specchat = Path(sys.executable).with_name("specchat")
    result = subprocess.run(
        [str(specchat), "run", "--model", "demo", "--draft", "demo-0.5b", "--max-new-tokens", "16"],
        input="Write a haiku about the sea", capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "draft demo-0.5b" in result.stderr


def test_demo_target_streamed_from_ssd_equals_resident(demo):
    """The demo target's 28 layers read from its 16-bit store every pass (O_DIRECT) == the resident model."""
    import torch

    from specchat.model.lm import causal_visibility
    from specchat.model.stream.build import load_streamed
    from specchat.common.paths import cache_dir
    from specchat.sources.facts import read_facts
    from specchat.weights.store import build_store, store_dir_for

    target_dir = demo.target.path
    dtype = read_facts(target_dir).stored_dtype
    store = build_store(target_dir, store_dir_for(cache_dir() / "stores", target_dir, dtype), dtype, dense_dtype=dtype)
    streamed = load_streamed(store, torch.float32, resident_layers=0)
    ids = torch.tensor(demo.encode_chat([{"role": "user", "content": "Write a haiku about the sea"}]))

    def logits(lm):
        return lm.forward(ids, torch.arange(len(ids)), causal_visibility(0, len(ids)), lm.new_cache())

    expected, got = logits(demo.target.lm), logits(streamed)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=2e-3, rtol=1e-4), (got - expected).abs().max()
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
