"""The self draft's head: the target's, or for narrow steps an int8 copy of a float32 head or a
shortlist head (an int4 copy ranks, the target's rows score the best)."""

import pytest
import torch
from torch import nn

from specchat.engine.config import GenerationConfig
from specchat.engine.engine import Engine
from specchat.model.cpulinear import use_weight_left_linears
from specchat.model.drafthead import PROBE_ROWS, PROBE_WIDTHS, NarrowHead, Shortlist, copy_bytes, draft_head
from specchat.model.loading import load_resident
from specchat.model.selfdraft import build_self_draft
from specchat.sources.facts import read_facts
from specchat.weights.lowbit import QUANTIZE_ROWS, Int4Linear, Int8Linear, int4_rounding
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


def test_the_int4_rounding_in_chunks_equals_rounding_the_whole_matrix():
    head = _head(QUANTIZE_ROWS + 96, hidden=64)
    q, scale, low = int4_rounding(head.weight.detach().reshape(-1, 2, 32))  # (out, in/g, g), 2 x (out, in/g)
    copy = Int4Linear.quantize(head)
    assert torch.equal(copy.packed, torch._convert_weight_to_int4pack_for_cpu(q.reshape(-1, 64).to(torch.int32), 1))
    assert torch.equal(copy.scales_zeros, torch.stack([scale, low + 8 * scale], -1).transpose(0, 1).bfloat16())


def test_the_unfitted_int4_rounding_takes_the_nearest_of_16_levels_from_min_to_max():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=False)
    groups = linear.weight.detach().reshape(48, 2, 32)
    low, high = groups.amin(-1), groups.amax(-1)
    step = (high - low) / 15
    want = low[..., None] + torch.round((groups - low[..., None]) / step[..., None]) * step[..., None]  # (out, in/g, g)
    x = torch.randn(3, 64)
    got = Int4Linear.quantize(linear, fit=False)(x)
    torch.testing.assert_close(got, x.bfloat16().float() @ want.reshape(48, 64).bfloat16().float().t(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("bias", [False, True])
def test_the_shortlist_scores_each_rows_best_tokens_by_the_head_itself(bias):
    torch.manual_seed(0)
    head = nn.Linear(64, 304, bias=bias)
    copy = Int4Linear.quantize(head, fit=False)
    shortlist = Shortlist(head, copy, shortlist=8)
    x = torch.randn(2, 5, 64)
    got, approx, exact = shortlist(x), copy(x), head(x)  # (2, 5, 300) each
    best = approx.topk(8, dim=-1).indices
    assert got.shape == (2, 5, 304) and list(shortlist.parameters()) == []
    torch.testing.assert_close(got.gather(-1, best), exact.gather(-1, best))  # the shortlisted: the head's own logits
    others = torch.ones_like(got, dtype=torch.bool).scatter_(-1, best, False)
    assert torch.equal(got[others], approx[others])  # the rest: the copy's
    assert torch.equal(got.argmax(-1), exact.argmax(-1))  # the head's favourite is always on the shortlist here
    assert shortlist.nbytes() == copy.nbytes() == 304 * 32 + 2 * 304 * 2 * 2 + (304 * 4 if bias else 0)  # weights, (scale, zero)s, bias


def _fake_seconds(costs):
    """A timer by formula: costs[the module's class name](rows); the target's head is a WeightLeftLinear."""
    calls = []

    def seconds(module, rows):
        name = type(module).__name__
        calls.append((name, rows.shape[0]))
        assert module.out_features == PROBE_ROWS  # the probe, not the whole head
        return costs[name](rows.shape[0])

    return seconds, calls


@pytest.mark.parametrize("int8_cost, shortlist_cost, own_cost, chosen_class, wide", [
    (lambda n: 1.0 * n, lambda n: 5.0, lambda n: 3.0, Int8Linear, 4),  # the copy's cost grows with the rows
    (lambda n: 0.5, lambda n: 0.6, lambda n: 1.0, Int8Linear, PROBE_WIDTHS[-1] * 2),  # faster at every width tried
    (lambda n: 2.0, lambda n: 0.25 * n, lambda n: 1.0, Shortlist, 4),  # the shortlist 4x faster at one row
    (lambda n: 1.0, lambda n: 1.0, lambda n: 1.0, None, None),  # neither faster at one row: no copy
    (lambda n: 2.0, lambda n: 3.0, lambda n: 1.0, None, None),
])
def test_the_copy_fastest_at_one_row_serves_the_steps_narrower_than_where_the_targets_head_is_as_fast(
    int8_cost, shortlist_cost, own_cost, chosen_class, wide
):
    head = _head(PROBE_ROWS + 16, hidden=32)
    seconds, calls = _fake_seconds({"Int8Linear": int8_cost, "Shortlist": shortlist_cost, "WeightLeftLinear": own_cost})
    chosen, why = draft_head(head, torch.float32, seconds)
    if wide is None:
        assert chosen is head and why.startswith("the target's head (no copy was faster here")
        assert calls == [("WeightLeftLinear", 1), ("Int8Linear", 1), ("WeightLeftLinear", 1), ("Shortlist", 1)]
        return
    assert isinstance(chosen, NarrowHead) and chosen.wide_rows == wide and chosen.head is head
    assert isinstance(chosen.copy, chosen_class) and chosen.copy.out_features == PROBE_ROWS + 16  # the whole head, once the probe decided
    assert why.startswith("an int8 copy of the target's head (0.00 GB)" if chosen_class is Int8Linear else "an int4 copy of the target's head to rank")
    assert f"for steps of fewer than {wide} rows" in why


def test_a_bf16_head_weighs_the_shortlist_alone():
    head = _head(PROBE_ROWS, hidden=32, dtype=torch.bfloat16)
    seconds, calls = _fake_seconds({"Shortlist": lambda n: 0.25 * n, "WeightLeftLinear": lambda n: 1.0})
    chosen, why = draft_head(head, torch.bfloat16, seconds)
    assert isinstance(chosen.copy, Shortlist) and chosen.wide_rows == 4 and {name for name, _ in calls} == {"Shortlist", "WeightLeftLinear"}
    assert copy_bytes(151_936, 1_536, torch.bfloat16) == 151_936 * 768 + 48 * 151_936 * 4  # the demo target's: 0.15 GB
    assert copy_bytes(151_936, 1_536, torch.float32) == 151_936 * 1_538  # the larger of the two: 0.23 GB


@pytest.mark.parametrize("vocab, hidden, dtype", [
    (PROBE_ROWS - 1, 32, torch.float32), (PROBE_ROWS - 1, 32, torch.bfloat16), (PROBE_ROWS, 32, torch.float64), (PROBE_ROWS, 32, torch.float16),
])
def test_a_small_vocabulary_or_a_float16_or_float64_head_is_never_copied(vocab, hidden, dtype):
    head = _head(vocab, hidden, dtype=dtype)
    seconds, calls = _fake_seconds({})
    assert draft_head(head, dtype, seconds) == (head, "the target's head") and calls == []
    assert copy_bytes(vocab, hidden, dtype) == 0


def test_the_pre_flight_counts_the_largest_head_copy_the_target_may_keep(tiny_dirs):
    from specchat.model.selfdraft import self_draft_bytes

    facts = read_facts(tiny_dirs["target"])
    assert self_draft_bytes(facts, "int4", torch.float32) == self_draft_bytes(facts, "int4", torch.bfloat16)  # 64 tokens: never copied
    layers = self_draft_bytes(facts, "int4", torch.float32)
    facts.config.vocab_size, hidden = PROBE_ROWS, int(facts.config.hidden_size)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            assert self_draft_bytes(facts, "int4", dtype) - layers == copy_bytes(PROBE_ROWS, hidden, dtype) > 0
    finally:
        facts.config.vocab_size = 64


@pytest.mark.parametrize("copy", ["int8", "shortlist"])
@pytest.mark.parametrize("method", ["specexec", "specinfer"])
def test_speculation_with_a_copied_head_is_exact(tiny_dirs, method, copy):
    """A self draft whose head is a copy for steps under 4 rows: greedy output == plain decoding."""
    target = load_resident(tiny_dirs["target"])
    own = build_self_draft(target.lm, read_facts(tiny_dirs["target"]), "int4")
    head = target.lm.lm_head
    made = Int8Linear.quantize(head) if copy == "int8" else Shortlist(head, Int4Linear.quantize(head, fit=False), shortlist=4)
    draft = target.lm.with_layers(own.layer_source, own.layer_dtype, True, NarrowHead(head, made, 4))
    prompt = [3, 9, 27, 14]
    plain = list(Engine(target.lm, None, CharTokenizer(), []).generate(prompt, GenerationConfig(method="ar", max_new_tokens=40)))
    config = GenerationConfig(method=method, budget=16, max_new_tokens=40)
    done = list(Engine(target.lm, draft, CharTokenizer(), [], clock=TickingClock()).generate(prompt, config))[-1]
    assert done.token_ids == plain[-1].token_ids and done.stats.tokens_per_pass > 1.5
