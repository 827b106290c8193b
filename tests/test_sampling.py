import pytest
import torch

from specchat.sampling import SamplingParams, probabilities, top_p_filter


@pytest.mark.parametrize(
    "probs, top_p, kept",
    [
        ([0.5, 0.3, 0.15, 0.05], 0.5, [0]),  # the top token alone reaches 0.5
        ([0.5, 0.3, 0.15, 0.05], 0.6, [0, 1]),
        ([0.5, 0.3, 0.15, 0.05], 0.8, [0, 1]),  # 0.5 + 0.3 reaches 0.8 exactly
        ([0.5, 0.3, 0.15, 0.05], 0.81, [0, 1, 2]),
        ([0.05, 0.15, 0.3, 0.5], 0.6, [2, 3]),  # order in the vocabulary does not matter
        ([0.5, 0.3, 0.15, 0.05], 1.0, [0, 1, 2, 3]),
        ([0.9, 0.1], 0.01, [0]),  # the most likely token is always kept
    ],
)
def test_top_p_keeps_the_smallest_most_probable_set(probs, top_p, kept):
    filtered = top_p_filter(torch.tensor([probs], dtype=torch.float64), top_p)[0]
    assert (filtered > 0).nonzero().flatten().tolist() == kept
    expected = torch.tensor(probs, dtype=torch.float64)[kept]
    assert torch.allclose(filtered[kept], expected / expected.sum())


def test_greedy_is_one_hot_on_the_argmax():
    probs = probabilities(torch.tensor([[0.1, 3.0, -1.0]]), SamplingParams(0.0))
    assert probs.tolist() == [[0.0, 1.0, 0.0]]


def test_temperature_sharpens():
    logits = torch.tensor([[1.0, 2.0]])
    hot = probabilities(logits, SamplingParams(2.0))[0, 1]
    cold = probabilities(logits, SamplingParams(0.5))[0, 1]
    assert cold > hot > 0.5


@pytest.mark.parametrize("temperature, top_p", [(-0.1, 1.0), (1.0, 0.0), (1.0, 1.5), (float("nan"), 1.0)])
def test_bad_sampling_parameters_are_refused(temperature, top_p):
    with pytest.raises(ValueError):
        SamplingParams(temperature, top_p)
