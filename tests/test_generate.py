"""Generation: greedy is deterministic, top-k=1 is greedy, top-p filters, eos stops."""

import math

import pytest
import torch

from shared.generation import (
    SettingError,
    check_settings,
    generate,
    next_token_distribution,
    top_k_filter,
    top_p_filter,
)
from shared.model import GPT, GPTConfig

VOCAB = 37


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(VOCAB, 16, 2, 2, 32)).eval()


def test_greedy_is_deterministic_and_is_argmax(model):
    idx = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(0))
    a = generate(model, idx, 20, temperature=0.0)
    b = generate(model, idx, 20, temperature=0.0)
    assert a.shape == (3, 25)
    assert torch.equal(a, b) and torch.equal(a[:, :5], idx)
    # each new token is the argmax of the model's logits on the (cropped) prefix
    for t in range(5, 25):
        logits = model(a[:, max(0, t - 16) : t])[:, -1]
        assert torch.equal(a[:, t], logits.argmax(-1))


def test_top_k_1_equals_greedy(model):
    idx = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(1))
    greedy = generate(model, idx, 12, temperature=0.0)
    g = torch.Generator().manual_seed(123)
    sampled = generate(model, idx, 12, temperature=1.7, top_k=1, generator=g)
    assert torch.equal(greedy, sampled)


def test_sampling_is_reproducible_with_a_generator(model):
    idx = torch.zeros(2, 1, dtype=torch.long)
    a = generate(model, idx, 10, generator=torch.Generator().manual_seed(5))
    b = generate(model, idx, 10, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_context_is_cropped(model):
    # far more tokens than the 16-token context: no error, and only the window matters
    idx = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    out = generate(model, idx, 3, temperature=0.0)
    assert out.shape == (1, 43)
    same_window = generate(model, idx[:, -16:], 3, temperature=0.0)
    assert torch.equal(out[:, -3:], same_window[:, -3:])


def test_top_p_on_a_hand_made_distribution():
    probs = torch.tensor([[0.05, 0.5, 0.1, 0.3, 0.05]])
    logits = probs.log()
    keep = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()
    assert keep(0.5) == [False, True, False, False, False]  # 0.5 alone reaches 0.5
    assert keep(0.6) == [False, True, False, True, False]  # 0.5 + 0.3
    assert keep(0.85) == [False, True, True, True, False]  # + 0.1 = 0.9
    kept = keep(0.92)  # 0.9 < 0.92: one of the two 0.05 tokens joins, not both
    assert kept[1:4] == [True, True, True] and kept[0] + kept[4] == 1
    assert all(keep(1.0))
    assert keep(0.01) == [False, True, False, False, False]  # the top token stays
    renorm = next_token_distribution(logits, top_p=0.6)
    torch.testing.assert_close(renorm, torch.tensor([[0, 0.5 / 0.8, 0, 0.3 / 0.8, 0]]))


def test_top_k_and_temperature():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isfinite(top_k_filter(logits, 2)).tolist() == [
        [False, True, True, False]
    ]
    assert torch.isfinite(top_k_filter(logits, 10)).all()  # k > vocab keeps everything
    hot = next_token_distribution(logits, temperature=100.0)
    torch.testing.assert_close(hot, torch.full((1, 4), 0.25), atol=0.01, rtol=0)
    cold = next_token_distribution(logits, temperature=0.01)
    torch.testing.assert_close(cold, torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    base = next_token_distribution(logits)
    torch.testing.assert_close(base, torch.softmax(logits, -1))
    assert math.isclose(next_token_distribution(logits, top_k=1)[0, 1].item(), 1.0)


def test_eos_stops_each_sequence(model):
    idx = torch.randint(0, VOCAB, (4, 3), generator=torch.Generator().manual_seed(3))
    free = generate(model, idx, 15, generator=torch.Generator().manual_seed(9))
    eos = int(free[0, 6])  # a token that row 0 emits at step 4
    out = generate(
        model, idx, 15, eos_id=eos, generator=torch.Generator().manual_seed(9)
    )
    assert out.size(1) <= 18
    for row in out[:, 3:]:
        hits = (row == eos).nonzero()
        if len(hits):  # after the first eos, only eos (padding)
            assert torch.all(row[hits[0, 0] :] == eos)
    # rows are unchanged up to their first eos (same random stream, same tokens)
    first = (out[0, 3:] == eos).nonzero()[0, 0].item()
    assert torch.equal(out[0, : 3 + first + 1], free[0, : 3 + first + 1])


def test_greedy_eos_stops_the_loop_early(model):
    idx = torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(4))
    greedy = generate(model, idx, 10, temperature=0.0)
    eos = int(greedy[0, 5])
    out = generate(model, idx, 10, temperature=0.0, eos_id=eos)
    assert out.size(1) < 14 and out[0, -1] == eos
    assert torch.equal(out, greedy[:, : out.size(1)])


def test_restores_training_mode_and_rejects_bad_input(model):
    model.train()
    generate(model, torch.zeros(1, 1, dtype=torch.long), 2)
    assert model.training
    model.eval()
    with pytest.raises(ValueError, match="batch, time"):
        generate(model, torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="top_p"):
        top_p_filter(torch.zeros(1, 3), 0.0)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 2)


def test_top_p_one_keeps_every_token_of_a_large_vocabulary():
    # 50,257 logits: the cumulative sum rounds, so "mass before >= 1.0" used to drop
    # tokens in the tail; p = 1.0 must mean the whole distribution
    logits = torch.randn(4, 50257, generator=torch.Generator().manual_seed(0)) * 3
    assert torch.isfinite(top_p_filter(logits, 1.0)).all()
    probs = next_token_distribution(logits, top_p=1.0)
    torch.testing.assert_close(probs, torch.softmax(logits, -1))


@pytest.mark.parametrize("temperature", [1e-38, 1e-40, 1e-320, 5e-324])
def test_tiny_temperatures_are_greedy_not_nan(model, temperature):
    # logits / 1e-38 overflowed to inf and softmax gave nan: now the largest logit
    # takes all the mass (ties share it), the limit of temperature -> 0
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0 - 1e-6], [-5.0, 0.0, 4.0, 4.0]])
    probs = next_token_distribution(logits, temperature=temperature)
    expected = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]])
    torch.testing.assert_close(probs, expected)
    idx = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(6))
    greedy = generate(model, idx, 8, temperature=0.0)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(generate(model, idx, 8, temperature, generator=g), greedy)


@pytest.mark.parametrize("p", [1e-300, 5e-324, 1e-50])
def test_top_p_below_float32_keeps_the_top_token(model, p):
    # p rounds to 0 against float32 masses: "mass before >= 0" dropped every token
    logits = torch.tensor([[0.1, 2.0, -1.0]])
    assert torch.isfinite(top_p_filter(logits, p)).tolist() == [[False, True, False]]
    probs = next_token_distribution(logits, top_p=p)
    torch.testing.assert_close(probs, torch.tensor([[0.0, 1.0, 0.0]]))
    idx = torch.zeros(1, 3, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    out = generate(model, idx, 6, top_p=p, generator=g)
    assert torch.equal(out, generate(model, idx, 6, temperature=0.0))


def test_check_settings_refuses_infinite_temperature():
    # inf used to pass: logits / inf sampled uniform noise on the command line
    for bad in (math.inf, math.nan, -1.0):
        with pytest.raises(SettingError, match="temperature") as err:
            check_settings(16, temperature=bad)
        assert err.value.param == "temperature"
    assert check_settings(16, temperature=1e-300) == ()  # tiny is greedy, not refused
    assert check_settings(16, temperature=1e300) == ()  # huge is near uniform
