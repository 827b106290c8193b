import pytest
import torch

from specchat.model.kvcache import KVCache, SharedPrefixCache


def _fill(cache: KVCache, values: list[float], layers: int = 2) -> None:
    t = torch.tensor(values, dtype=torch.float64).view(1, 1, -1, 1)  # (1, heads, T, dim)
    for layer in range(layers):
        cache.update(t, -t, layer)


def _keys(cache: KVCache, layer: int = 0) -> list[float]:
    return cache._keys[layer][0, 0, : cache.length, 0].tolist()


def test_update_returns_all_valid_slots_and_grows_capacity():
    cache = KVCache(num_layers=2, initial_capacity=2)
    _fill(cache, [1, 2, 3])
    _fill(cache, [4, 5])
    assert cache.length == 5
    keys, values = cache.update(torch.ones(1, 1, 0, 1, dtype=torch.float64), torch.ones(1, 1, 0, 1, dtype=torch.float64), 0)
    assert keys[0, 0, :, 0].tolist() == [1, 2, 3, 4, 5]
    assert values[0, 0, :, 0].tolist() == [-1, -2, -3, -4, -5]


@pytest.mark.parametrize("lengths, capacity", [([3], 4), ([1, 1], 2), ([2, 3], 8), ([5, 4], 16), ([1] * 9, 16)])
def test_capacity_is_the_initial_one_times_a_power_of_two(lengths, capacity):
    cache = KVCache(num_layers=2, initial_capacity=2)
    for n, length in enumerate(lengths):
        _fill(cache, list(range(10 * n, 10 * n + length)))
    # (1, kv_heads, capacity, head_dim) per buffer, float64: a few sizes recur whatever the lengths
    assert cache.nbytes() == 2 * 2 * capacity * 8


def test_reset_frees_the_buffers_and_the_cache_fills_again():
    cache = KVCache(num_layers=2, initial_capacity=2)
    _fill(cache, [1, 2, 3])
    assert cache.nbytes() > 0
    cache.reset()
    assert (cache.length, cache.nbytes()) == (0, 0)
    _fill(cache, [4, 5])
    assert _keys(cache, 1) == [4, 5]


def test_keep_moves_accepted_slots_behind_the_prefix_in_every_layer():
    cache = KVCache(num_layers=2)
    _fill(cache, [10, 11, 12, 20, 21, 22, 23])  # prefix of 3, then a 4-node tree
    cache.keep(3, torch.tensor([3, 5, 6]))
    assert cache.length == 6
    for layer in range(2):
        assert _keys(cache, layer) == [10, 11, 12, 20, 22, 23]
        assert cache._values[layer][0, 0, :6, 0].tolist() == [-10, -11, -12, -20, -22, -23]


def test_keep_nothing_drops_the_tree():
    cache = KVCache(num_layers=1)
    _fill(cache, [1, 2, 3, 4], layers=1)
    cache.keep(2, torch.tensor([], dtype=torch.long))
    assert _keys(cache) == [1, 2]


def test_crop_rolls_back_and_appends_after():
    cache = KVCache(num_layers=2)
    _fill(cache, [1, 2, 3, 4])
    cache.crop(2)
    _fill(cache, [7])
    assert _keys(cache) == [1, 2, 7]


def test_a_forward_interrupted_between_layers_counts_only_what_every_layer_holds():
    cache = KVCache(num_layers=3)
    _fill(cache, [1, 2], layers=3)
    t = torch.tensor([5.0, 6.0], dtype=torch.float64).view(1, 1, -1, 1)
    cache.update(t, -t, 0)  # Ctrl-C after layer 0 of the next forward
    assert cache.length == 2
    cache.crop(cache.length)  # what the engine's rollback does
    _fill(cache, [7], layers=3)
    for layer in range(3):
        assert _keys(cache, layer) == [1, 2, 7]


@pytest.mark.parametrize("length", [-1, 5])
def test_crop_out_of_range_is_refused(length):
    cache = KVCache(num_layers=1)
    _fill(cache, [1, 2, 3], layers=1)
    with pytest.raises(ValueError):
        cache.crop(length)


def test_keep_refuses_slots_inside_the_prefix_or_past_the_end():
    cache = KVCache(num_layers=1)
    _fill(cache, [1, 2, 3, 4], layers=1)
    with pytest.raises(ValueError):
        cache.keep(2, torch.tensor([1]))
    with pytest.raises(ValueError):
        cache.keep(2, torch.tensor([4]))


def test_the_cache_goes_to_each_decoder_layer_under_the_name_its_forward_takes():
    from specchat.model.lm import _cache_keyword

    class Older:  # transformers before 5.24
        def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, **kwargs): ...

    class Newer:
        def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, **kwargs): ...

    assert _cache_keyword(Older) == "past_key_values" and _cache_keyword(Newer) == "cache"


def _seen(cache, values: list[float], layers: int = 2) -> list[list[float]]:
    """What each layer attends over after appending ``values`` (keys)."""
    t = torch.tensor(values, dtype=torch.float64).view(1, 1, -1, 1)
    return [cache.update(t, -t, layer)[0][0, 0, :, 0].tolist() for layer in range(layers)]


def test_a_shared_prefix_cache_attends_to_the_targets_prefix_then_its_own_tail():
    base = KVCache(num_layers=2)
    _fill(base, [1, 2, 3])
    view = SharedPrefixCache(base)
    assert view.length == 3  # it follows the target's cache: nothing to prefill
    assert _seen(view, [30, 31]) == [[1, 2, 3, 30, 31]] * 2
    assert view.length == 5 and base.length == 3  # the target's cache is never written
    _fill(base, [4, 5, 6, 7])  # the target verifies a 4-node tree
    assert view.length == 5  # the tail stays behind the prefix it was grown on
    base.keep(3, torch.tensor([3, 5]))  # the target keeps its accepted path
    view.keep(3, torch.tensor([3]))
    assert view.length == 5 and view.tail.length == 0  # ... and the draft attends to those, not its own
    assert _seen(view, [40]) == [[1, 2, 3, 4, 6, 40]] * 2


def test_a_shared_prefix_cache_crops_its_tail_and_follows_the_target_back():
    base = KVCache(num_layers=2)
    _fill(base, [1, 2, 3, 4])
    view = SharedPrefixCache(base)
    _seen(view, [30, 31, 32])
    view.crop(5)
    assert view.length == 5 and view.tail.length == 1
    base.crop(2)
    view.crop(2)  # the engine crops the target's cache first, to the same limit
    assert view.length == 2 and _seen(view, [50]) == [[1, 2, 50]] * 2
    view.tail.crop(0)
    with pytest.raises(ValueError, match="crop the target's cache to 1 first"):
        view.crop(1)
    with pytest.raises(ValueError, match="cannot crop a cache of 2 positions to 3"):
        view.crop(3)


def test_a_shared_prefix_cache_over_an_empty_target_cache_is_the_tail_alone():
    base = KVCache(num_layers=1)
    view = SharedPrefixCache(base)
    assert _seen(view, [7, 8], layers=1) == [[7, 8]]
    view.reset()
    assert view.length == 0


def test_a_shared_prefix_cache_keeps_unverified_draft_entries_then_hands_the_prefix_to_the_target():
    """The lookahead's two moves: compact the tail to the root and the predicted path (the target
    has not verified them), then, once it has, keep only the entries beyond them."""
    base = KVCache(num_layers=2)
    _fill(base, [1, 2, 3])
    view = SharedPrefixCache(base)
    _seen(view, [30, 31, 32, 33])  # the root (slot 3) and three tree nodes (slots 4-6)
    view.keep_draft(4, torch.tensor([5]))  # root + the predicted node at slot 5
    assert view.length == 5 and view.tail.length == 2 and _seen(view, [40, 41]) == [[1, 2, 3, 30, 32, 40, 41]] * 2
    _fill(base, [4, 5, 6, 7])  # the target's pass, then its accepted path (root + one node)
    base.keep(3, torch.tensor([3, 5]))
    view.keep_draft(5, torch.tensor([6]))  # the target now holds 5 positions: the tail keeps slot 6 (41) alone
    assert view.length == 6 and view.tail.length == 1
    assert _seen(view, [50]) == [[1, 2, 3, 4, 6, 41, 50]] * 2  # the target's prefix, then the draft's own
    with pytest.raises(ValueError, match="cannot keep 2 positions"):
        view.keep_draft(2, torch.tensor([], dtype=torch.long))


def test_a_cache_of_its_own_keeps_draft_entries_as_it_keeps_any():
    cache = KVCache(num_layers=2)
    _fill(cache, [1, 2, 3, 4, 5])
    cache.keep_draft(2, torch.tensor([3, 4]))
    assert cache.length == 4 and _seen(cache, [9]) == [[1, 2, 4, 5, 9]] * 2
