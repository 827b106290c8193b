"""The self draft's head: the target's, or an int8 copy of a float32 head for narrow steps."""

import pytest
import torch
from torch import nn

from specchat.engine.config import GenerationConfig
from specchat.engine.engine import Engine
from specchat.model.cpulinear import use_weight_left_linears
from specchat.model.drafthead import PROBE_ROWS, PROBE_WIDTHS, NarrowHead, copy_bytes, draft_head
from specchat.model.loading import load_resident
from specchat.model.selfdraft import build_self_draft
from specchat.sources.facts import read_facts
from specchat.weights.lowbit import QUANTIZE_ROWS, Int8Linear
from tiny import CharTokenizer, TickingClock


def _head(vocab: int, hidden: int = 16, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(0)
    return use_weight_left_linears(nn.Sequential(nn.Linear(hidden, vocab, bias=False)))[0].to(dtype)


def test_narrow_steps_use_the_int8_copy_and_wide_ones_the_targets_head():
    head = _head(300)
    copy = Int8Linear.quantize(head)
    narrow = NarrowHead(head, copy, wide_rows=4)
    x3, x4 = torch.randn(1, 3, 16), torch.randn(4, 16)
    assert torch.equal(narrow(x3), copy(x3)) and narrow(x3).shape == (1, 3, 300)
    torch.testing.assert_close(narrow(x3), head(x3), rtol=0.05, atol=0.05)  # int8 weights, bf16 rows
    assert torch.equal(narrow(x4), head(x4))
    assert narrow.nbytes() == 300 * 16 + 300 * 2  # int8 weights and a bf16 scale per row
    assert list(narrow.parameters()) == []  # the target's head is not this module's own


def test_the_int8_rounding_in_chunks_equals_rounding_the_whole_matrix():
    head = _head(QUANTIZE_ROWS + 300)
    weight = head.weight.detach()
    scale = (weight.abs().amax(1) / 127).clamp(min=1e-12)
    copy = Int8Linear.quantize(head)
    assert torch.equal(copy.weight_int8, torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
    assert torch.equal(copy.scales, scale.bfloat16())


def _fake_seconds(copy_cost, own_cost):
    """A timer by formula: the copy's product costs copy_cost(rows), the target's own_cost(rows)."""
    calls = []

    def seconds(module, rows):
        calls.append((type(module).__name__, rows.shape[0]))
        assert rows.dtype == torch.float32 and module.out_features == PROBE_ROWS  # the probe, not the whole head
        return copy_cost(rows.shape[0]) if isinstance(module, Int8Linear) else own_cost(rows.shape[0])

    return seconds, calls


@pytest.mark.parametrize("copy_cost, own_cost, wide", [
    (lambda n: 1.0 * n, lambda n: 3.0, 4),  # the copy's cost grows with the rows
    (lambda n: 0.5, lambda n: 1.0, PROBE_WIDTHS[-1] * 2),  # faster at every width tried
    (lambda n: 1.0, lambda n: 1.0, None),  # no faster at one row: no copy
    (lambda n: 2.0, lambda n: 1.0, None),
])
def test_a_copy_serves_the_steps_narrower_than_the_first_width_where_the_targets_head_is_as_fast(copy_cost, own_cost, wide):
    head = _head(PROBE_ROWS + 5)
    seconds, calls = _fake_seconds(copy_cost, own_cost)
    chosen, why = draft_head(head, torch.float32, seconds)
    if wide is None:
        assert chosen is head and why.startswith("the target's head (an int8 copy was no faster here")
        assert calls == [("WeightLeftLinear", 1), ("Int8Linear", 1)]
        return
    assert isinstance(chosen, NarrowHead) and chosen.wide_rows == wide and chosen.head is head
    assert chosen.copy.out_features == PROBE_ROWS + 5  # the whole head, once the probe decided
    assert why.startswith("an int8 copy of the target's head (0.00 GB) for steps of fewer than")


@pytest.mark.parametrize("vocab, dtype", [(PROBE_ROWS, torch.bfloat16), (PROBE_ROWS, torch.float64), (PROBE_ROWS - 1, torch.float32)])
def test_only_a_float32_head_of_a_large_vocabulary_is_weighed(vocab, dtype):
    head = _head(vocab, dtype=dtype)
    seconds, calls = _fake_seconds(lambda n: 0.0, lambda n: 1.0)
    assert draft_head(head, dtype, seconds) == (head, "the target's head") and calls == []
    assert copy_bytes(vocab, 16, dtype) == 0
    assert copy_bytes(151_936, 1_536, torch.float32) == 151_936 * 1_538  # the demo target's: 0.23 GB


def test_the_pre_flight_counts_the_head_copy_a_float32_target_may_keep(tiny_dirs):
    from specchat.model.selfdraft import self_draft_bytes

    facts = read_facts(tiny_dirs["target"])
    assert self_draft_bytes(facts, "int4", torch.float32) == self_draft_bytes(facts, "int4", torch.bfloat16)  # 64 tokens: never copied
    facts.config.vocab_size, hidden = PROBE_ROWS, int(facts.config.hidden_size)
    try:
        assert self_draft_bytes(facts, "int4", torch.float32) - self_draft_bytes(facts, "int4", torch.bfloat16) == PROBE_ROWS * (hidden + 2)
    finally:
        facts.config.vocab_size = 64


@pytest.mark.parametrize("method", ["specexec", "specinfer"])
def test_speculation_with_a_copied_head_is_exact(tiny_dirs, method):
    """A self draft whose head is an int8 copy for steps under 4 rows: greedy output == plain decoding."""
    target = load_resident(tiny_dirs["target"])
    own = build_self_draft(target.lm, read_facts(tiny_dirs["target"]), "int4")
    draft = target.lm.with_layers(own.layer_source, own.layer_dtype, True, NarrowHead(target.lm.lm_head, Int8Linear.quantize(target.lm.lm_head), 4))
    prompt = [3, 9, 27, 14]
    plain = list(Engine(target.lm, None, CharTokenizer(), []).generate(prompt, GenerationConfig(method="ar", max_new_tokens=40)))
    config = GenerationConfig(method=method, budget=16, max_new_tokens=40)
    done = list(Engine(target.lm, draft, CharTokenizer(), [], clock=TickingClock()).generate(prompt, config))[-1]
    assert done.token_ids == plain[-1].token_ids and done.stats.tokens_per_pass > 1.5
