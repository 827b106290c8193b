"""Speculative greedy == plain greedy; draft = target accepts everything; cache reuse."""

import pytest
import torch

from specchat.engine.config import EngineError, GenerationConfig
from specchat.engine.engine import Engine
from specchat.engine.events import DoneEvent, TextEvent
from specchat.model.lm import LayeredLM, causal_visibility
from specchat.speculation.lookahead import Lookahead

from tiny import CharTokenizer, tiny_hf, tiny_lm

PROMPTS = [[1], [3, 9, 27], [5, 4, 3, 2, 1, 6, 7, 8, 9, 10, 11]]


def run(engine: Engine, prompt, **config) -> tuple[DoneEvent, list[TextEvent]]:
    events = list(engine.generate(prompt, GenerationConfig(**config)))
    return events[-1], [e for e in events if isinstance(e, TextEvent)]


def ar_tokens(target, prompt, n) -> tuple[int, ...]:
    done, _ = run(Engine(target, None, CharTokenizer(), []), prompt, method="ar", max_new_tokens=n)
    return done.token_ids


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_layered_forward_equals_the_transformers_forward(arch):
    hf = tiny_hf(3, arch=arch)
    ids = torch.tensor([4, 8, 15, 16, 23, 42])
    lm = LayeredLM(hf)
    ours = lm.forward(ids, torch.arange(6), causal_visibility(0, 6), lm.new_cache())
    theirs = hf(ids[None]).logits[0]
    assert torch.allclose(ours.double(), theirs, atol=1e-6)


@pytest.mark.parametrize("method", ["specexec", "specinfer"])
@pytest.mark.parametrize("budget", [1, 4, 16, 64])
@pytest.mark.parametrize("draft_kind", ["same", "random"])
def test_greedy_speculation_equals_greedy_autoregression(method, budget, draft_kind):
    for seed in range(3):
        target = tiny_lm(seed)
        draft = tiny_lm(seed) if draft_kind == "same" else tiny_lm(100 + seed)
        for prompt in PROMPTS:
            expected = ar_tokens(target, prompt, 40)
            engine = Engine(target, draft, CharTokenizer(), [])
            done, _ = run(engine, prompt, method=method, budget=budget, max_new_tokens=40, draft_batch=4)
            assert done.token_ids == expected, (seed, prompt)


def test_greedy_equivalence_holds_for_qwen2_and_a_deep_narrow_search():
    target, draft = tiny_lm(7, arch="qwen2"), tiny_lm(8, arch="qwen2")
    expected = ar_tokens(target, [2, 4, 6], 50)
    engine = Engine(target, draft, CharTokenizer(), [])
    done, _ = run(engine, [2, 4, 6], budget=32, max_depth=3, draft_batch=1, max_new_tokens=50)
    assert done.token_ids == expected


def peaked(seed: int) -> LayeredLM:
    """A model confident enough that its best-first tree is its greedy chain."""
    hf = tiny_hf(seed)
    with torch.no_grad():
        hf.lm_head.weight.mul_(20.0)
    return LayeredLM(hf)


@pytest.mark.parametrize("method", ["specexec", "specinfer"])
def test_draft_equal_to_target_accepts_the_whole_deepest_path(method):
    target = peaked(0)
    budget, max_depth = 12, 6
    engine = Engine(target, target, CharTokenizer(), [])
    done, passes = run(engine, [1, 2, 3], method=method, budget=budget, max_depth=max_depth, max_new_tokens=70, adaptive=False)
    depth = max_depth if method == "specexec" else 3  # specinfer's 12-node tree: 2+4+6 nodes, depth 3
    assert [p.accepted for p in passes[:-1]] == [depth] * (len(passes) - 1)
    assert done.token_ids == ar_tokens(target, [1, 2, 3], 70)


def test_unrelated_draft_gives_about_one_token_per_pass():
    target, draft = tiny_lm(0), tiny_lm(55)
    engine = Engine(target, draft, CharTokenizer(), [])
    done, _ = run(engine, [1, 2, 3], budget=4, max_new_tokens=60)
    assert done.token_ids == ar_tokens(target, [1, 2, 3], 60)
    assert done.stats.tokens_per_pass < 1.6


@pytest.mark.parametrize("draft_kind", ["same", "peaked", "random"])
@pytest.mark.parametrize("budget", [1, 4, 16])
def test_greedy_specexec_with_the_lookahead_equals_greedy_autoregression(draft_kind, budget):
    """The next tree grown while the target verifies: the same output, and with a draft that
    agrees with the target the bet wins on most passes."""
    hits = passes = 0
    for seed in range(3):
        target = peaked(seed) if draft_kind == "peaked" else tiny_lm(seed)
        draft = tiny_lm(100 + seed) if draft_kind == "random" else target
        for prompt in PROMPTS:
            engine = Engine(target, draft, CharTokenizer(), [], lookahead=Lookahead(patient=True))
            done, _ = run(engine, prompt, budget=budget, max_new_tokens=40, draft_batch=4)
            assert done.token_ids == ar_tokens(target, prompt, 40), (seed, prompt)
            hits, passes = hits + done.stats.lookahead_hits, passes + done.stats.target_passes
    if draft_kind == "peaked":
        assert hits > passes / 2
    elif draft_kind == "random":
        assert hits < passes / 4


def test_with_the_lookahead_the_caches_describe_the_conversation_between_replies_and_after_an_interrupt():
    target, draft = peaked(0), peaked(0)
    engine = Engine(target, draft, CharTokenizer(), [], lookahead=Lookahead(patient=True))
    first, _ = run(engine, [1, 2, 3], budget=8, max_new_tokens=30)
    assert first.stats.lookahead_hits > 0
    assert engine.target_cache.length == len(engine.tokens) - 1 >= engine.draft_cache.length
    history = [1, 2, 3, *first.token_ids, 7, 8]
    second, _ = run(engine, history, budget=8, max_new_tokens=30)
    assert second.token_ids == ar_tokens(target, history, 30)
    stream = engine.generate(history + list(second.token_ids), GenerationConfig(budget=8, max_new_tokens=40))
    next(stream), next(stream)
    stream.close()  # between passes, with a tree begun for the next one
    assert engine.target_cache.length == len(engine.tokens) - 1 >= engine.draft_cache.length
    third, _ = run(engine, engine.tokens, budget=8, max_new_tokens=10)
    assert third.token_ids == ar_tokens(target, engine.tokens[: len(engine.tokens) - 10], 10)


def test_the_lookahead_stays_out_of_specinfer_and_of_plain_decoding():
    target = peaked(0)
    engine = Engine(target, target, CharTokenizer(), [], lookahead=Lookahead(patient=True))
    for method in ("specinfer", "ar"):
        done, _ = run(engine, [1, 2, 3], method=method, budget=8, max_new_tokens=20)
        assert done.token_ids == ar_tokens(target, [1, 2, 3], 20) and done.stats.lookahead_hits == 0


def test_pruned_cache_forward_equals_a_fresh_forward_on_the_accepted_sequence():
    target, draft = tiny_lm(0), tiny_lm(0)
    engine = Engine(target, draft, CharTokenizer(), [])
    run(engine, [1, 2, 3], budget=16, max_new_tokens=9)
    tokens = engine.tokens
    assert engine.target_cache.length == len(tokens) - 1
    root = torch.tensor(tokens[-1:])
    cached = target.forward(root, torch.tensor([len(tokens) - 1]), causal_visibility(len(tokens) - 1, 1), engine.target_cache)
    fresh = target.forward(torch.tensor(tokens), torch.arange(len(tokens)), causal_visibility(0, len(tokens)), target.new_cache())
    assert torch.allclose(cached[0], fresh[-1], atol=1e-9)
    # The draft cache describes a prefix of the same conversation.
    n = engine.draft_cache.length
    draft_next = draft.forward(torch.tensor(tokens[n:]), torch.arange(n, len(tokens)), causal_visibility(n, len(tokens) - n), engine.draft_cache)
    draft_fresh = draft.forward(torch.tensor(tokens), torch.arange(len(tokens)), causal_visibility(0, len(tokens)), draft.new_cache())
    assert torch.allclose(draft_next[-1], draft_fresh[-1], atol=1e-9)


def test_a_second_call_prefills_only_its_new_tokens_and_matches_a_fresh_engine():
    target, draft = tiny_lm(0), tiny_lm(1)
    engine = Engine(target, draft, CharTokenizer(), [])
    first, _ = run(engine, [1, 2, 3, 4], max_new_tokens=12)
    history = [1, 2, 3, 4, *first.token_ids, 9, 10, 11]
    second, _ = run(engine, history, max_new_tokens=12)
    assert second.stats.prefill_tokens == 3  # last reply token + 3 new ones, less the pending root
    fresh, _ = run(Engine(target, draft, CharTokenizer(), []), history, max_new_tokens=12)
    assert fresh.stats.prefill_tokens == len(history) - 1
    assert second.token_ids == fresh.token_ids


def test_a_changed_history_rolls_the_caches_back_to_the_common_prefix():
    target, draft = tiny_lm(0), tiny_lm(1)
    engine = Engine(target, draft, CharTokenizer(), [])
    run(engine, [1, 2, 3, 4, 5, 6], max_new_tokens=8)
    done, _ = run(engine, [1, 2, 9, 9], max_new_tokens=8)
    assert done.stats.prefill_tokens == 1
    assert done.token_ids == ar_tokens(target, [1, 2, 9, 9], 8)


def test_a_new_conversation_or_a_reset_frees_the_buffers_the_last_one_grew():
    target, draft = tiny_lm(0), tiny_lm(1)
    engine = Engine(target, draft, CharTokenizer(), [])
    run(engine, list(range(1, 61)) * 6, max_new_tokens=8)  # 360 tokens: past the first 256 slots
    grown = engine.target_cache.nbytes()
    done, _ = run(engine, [7, 8, 9], max_new_tokens=8)  # shares nothing with it
    assert engine.target_cache.nbytes() < grown and done.token_ids == ar_tokens(target, [7, 8, 9], 8)
    engine.reset()
    assert engine.target_cache.nbytes() == engine.draft_cache.nbytes() == 0 and engine.tokens == []
    again, _ = run(engine, [7, 8, 9], max_new_tokens=8)
    assert again.token_ids == done.token_ids


def test_generation_stops_at_eos_and_at_max_new_tokens():
    target = tiny_lm(0)
    expected = ar_tokens(target, [1, 2, 3], 30)
    eos = expected[5]
    first = expected.index(eos)
    engine = Engine(target, tiny_lm(0), CharTokenizer(), [eos])
    done, _ = run(engine, [1, 2, 3], budget=16, max_new_tokens=30)
    assert done.token_ids == expected[: first + 1]
    assert done.stats.finish_reason == "eos"
    done, _ = run(Engine(target, tiny_lm(0), CharTokenizer(), []), [1, 2, 3], budget=16, max_new_tokens=7)
    assert done.token_ids == expected[:7] and done.stats.finish_reason == "length"


def test_stop_string_ends_the_text_before_it():
    target = tiny_lm(0)
    expected = ar_tokens(target, [1, 2, 3], 30)
    text = CharTokenizer().decode(expected)
    stop = text[10:12]
    cut = text.index(stop)
    engine = Engine(target, tiny_lm(0), CharTokenizer(), [])
    done, events = run(engine, [1, 2, 3], budget=16, max_new_tokens=30, stop=(stop,))
    assert done.text == text[:cut]
    assert "".join(e.text for e in events) == text[:cut]
    assert done.stats.finish_reason == "stop"
    assert engine.tokens == [1, 2, 3, *expected[: cut + 2]]


def test_streamed_text_concatenates_to_the_final_text_and_stats_add_up():
    engine = Engine(tiny_lm(0), tiny_lm(0), CharTokenizer(), [])
    done, events = run(engine, [1, 2, 3], budget=8, max_new_tokens=25)
    assert "".join(e.text for e in events) == done.text == CharTokenizer().decode(done.token_ids)
    assert sum(len(e.token_ids) for e in events) == done.stats.new_tokens == 25
    assert done.stats.target_passes == len(events)
    assert all(1 <= len(e.token_ids) <= 9 for e in events)


def test_closing_the_generator_mid_reply_leaves_consistent_caches():
    target, draft = tiny_lm(0), tiny_lm(0)
    engine = Engine(target, draft, CharTokenizer(), [])
    stream = engine.generate([1, 2, 3], GenerationConfig(budget=8, max_new_tokens=40))
    next(stream)
    stream.close()
    assert engine.target_cache.length == len(engine.tokens) - 1
    done, _ = run(engine, engine.tokens, max_new_tokens=10)
    history = engine.tokens[: len(engine.tokens) - len(done.token_ids)]
    fresh, _ = run(Engine(target, draft, CharTokenizer(), []), history, max_new_tokens=10)
    assert done.token_ids == fresh.token_ids


@pytest.mark.parametrize(
    "prompt, config, message",
    [
        ([], {}, "empty"),
        (list(range(1, 60)) * 9, {}, "context"),
        ([1], {"method": "specexec", "_no_draft": True}, "draft"),
    ],
)
def test_bad_requests_raise_engine_errors(prompt, config, message):
    no_draft = config.pop("_no_draft", False)
    engine = Engine(tiny_lm(0), None if no_draft else tiny_lm(1), CharTokenizer(), [])
    with pytest.raises(EngineError, match=message):
        list(engine.generate(prompt, GenerationConfig(**config)))


@pytest.mark.parametrize(
    "field, value", [("budget", 0), ("budget", -3), ("max_new_tokens", 0), ("method", "beam"), ("top_p", 0.0), ("temperature", -1.0)]
)
def test_bad_generation_config_is_refused(field, value):
    with pytest.raises(ValueError):
        GenerationConfig(**{field: value})


def test_an_int8_draft_changes_acceptance_never_the_output():
    from specchat.model.loading import quantize_int8

    target = LayeredLM(tiny_hf(0, dtype=torch.float32))
    draft = quantize_int8(LayeredLM(tiny_hf(0, dtype=torch.float32)))
    expected = ar_tokens(target, [1, 2, 3], 40)
    done, _ = run(Engine(target, draft, CharTokenizer(), []), [1, 2, 3], budget=16, max_new_tokens=40, adaptive=False)
    assert done.token_ids == expected
    original = LayeredLM(tiny_hf(0, dtype=torch.float32))
    reference, _ = run(Engine(target, original, CharTokenizer(), []), [1, 2, 3], budget=16, max_new_tokens=40, adaptive=False)
    # The exact copy's favourite is always taken, so its learned trees go deeper than the int8 copy's.
    assert done.stats.tokens_per_pass >= 0.6 * reference.stats.tokens_per_pass > 1.5


def test_a_long_prefill_reports_its_progress_in_tenths_and_changes_nothing():
    from specchat.engine.events import PrefillEvent

    target, prompt = tiny_lm(0), [(7 * i) % 60 + 1 for i in range(200)]
    events = list(Engine(target, tiny_lm(1), CharTokenizer(), [], prefill_chunk=16).generate(prompt, GenerationConfig(budget=4, max_new_tokens=6)))
    progress = [e for e in events if isinstance(e, PrefillEvent)]
    assert [e.total for e in progress] == [199] * len(progress) and progress[-1].done == 199
    assert [10 * e.done // 199 for e in progress] == sorted(set(10 * e.done // 199 for e in progress))  # one per tenth
    assert 5 <= len(progress) <= 10 and isinstance(events[-1], DoneEvent)
    assert events[-1].token_ids == ar_tokens(target, prompt, 6)
    short = list(Engine(target, None, CharTokenizer(), []).generate(prompt[:10], GenerationConfig(method="ar", max_new_tokens=2)))
    assert not any(isinstance(e, PrefillEvent) for e in short)


def test_sampled_specexec_with_the_lookahead_resumes_trees_and_repeats_itself_for_a_seed():
    """Sampled, the walk draws from the target at every node, so any tree keeps the target's
    distribution (the chi-square tests, tests/test_sampling_distribution.py); here: resumed
    trees occur, and a seed still fixes the reply."""
    target = peaked(0)
    replies = []
    for _ in range(2):
        engine = Engine(target, target, CharTokenizer(), [], lookahead=Lookahead(patient=True))
        done, _ = run(engine, [1, 2, 3], budget=8, max_new_tokens=40, temperature=0.7, top_p=0.9, seed=7)
        assert done.stats.lookahead_hits > 0
        replies.append(done.token_ids)
    assert replies[0] == replies[1]
