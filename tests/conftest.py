import os
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import PreTrainedTokenizerFast

from specchat.common.paths import cache_dir
from tiny import tiny_hf

# The user's cache, which the tests share for the demo models and their stores only (converting
# them takes minutes); anything else a test writes there is a leak (see ``isolated_home``).
SHARED_CACHE = cache_dir()
SHARED_FOLDERS = ("files", "models", "stores")

WORDS = "the a sea wave blue moon fish sand wind salt deep calm tide ship gull foam rock reef shell crab kelp pier cove dune".split()
SPECIALS = ["<unk>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tiny_tokenizer(extra_word: str | None = None) -> PreTrainedTokenizerFast:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    vocab_list = SPECIALS + WORDS + letters + ([extra_word] if extra_word else [])
    vocab = {w: i for i, w in enumerate(dict.fromkeys(vocab_list))}
    assert len(vocab) == 64 + bool(extra_word), len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[2:]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tiny_model(directory: Path, seed: int, tokenizer) -> Path:
    model = tiny_hf(seed, arch="qwen2", vocab=64, dtype=torch.float32)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    tok = tiny_tokenizer()
    return {
        "target": save_tiny_model(root / "target", 0, tok),
        "draft": save_tiny_model(root / "draft", 1, tok),
        "alien": save_tiny_model(root / "alien", 2, tiny_tokenizer(extra_word="zebra")),
    }


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """No test reads the user's config; the demo cache stays shared to avoid re-converting, and
    a test that leaves anything else in it fails (the entry removed).

    ``--dtype auto`` sees a CPU without bf16 matrix instructions, so every test computes in
    float32 whatever machine runs it; the bf16 tests ask for it (tests/test_precision.py)."""
    monkeypatch.setattr("specchat.common.system.CPUINFO", tmp_path / "no-cpuinfo")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    for key in list(os.environ):
        if key.startswith("SPECCHAT_"):
            monkeypatch.delenv(key)
    before = _shared_cache_entries()
    yield
    leaked = sorted(p for p in _shared_cache_entries() - before if not p.name.lstrip(".").startswith("demo-"))
    for path in leaked:  # removed, so that a leak does not pile up run after run
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if leaked:
        pytest.fail(f"the test wrote {', '.join(map(str, leaked))} into the user's cache: give it a --store "
                    "(or an XDG_CACHE_HOME) of its own")


def _shared_cache_entries() -> set[Path]:
    return {entry for folder in SHARED_FOLDERS if (SHARED_CACHE / folder).is_dir() for entry in (SHARED_CACHE / folder).iterdir()}
