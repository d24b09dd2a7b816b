"""``shared.evaluation.instructions``: batched greedy answers give every prompt the
answer it gets alone, whatever else is in its batch."""

from __future__ import annotations

import pytest
import torch

from shared.evaluation import answers
from shared.generation import generate
from shared.model import GPT, GPTConfig
from shared.tokenizer import course_tokenizer


@pytest.fixture(scope="module")
def setup():
    tok = course_tokenizer()
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=tok.vocab_size, context_length=32, n_layer=2, n_head=2, n_embd=32
    )
    model = GPT(cfg).double().eval()  # float64: batching cannot flip a greedy token
    return model, tok


def test_a_short_prompt_keeps_its_budget_beside_a_long_one(setup):
    model, tok = setup
    long = "ROMEO: " + "my lord, " * 8  # most of the 32-token window
    short = "JULIET:"
    n_long = len(tok.encode(long))
    assert 24 <= n_long < 32
    budgets = [4, 20]
    pairs = zip([long, short], budgets, strict=True)
    alone = [answers(model, tok, [p], b)[0] for p, b in pairs]
    # the short prompt really answers past the long prompt's room (32 - n_long)
    assert len(tok.encode(alone[1])) > 32 - n_long
    together = answers(model, tok, [long, short], budgets)
    assert together == alone


def test_answers_equal_plain_greedy_generation(setup):
    model, tok = setup
    eos = tok.special_tokens["<|endoftext|>"]
    prompts = ["KING:", "To be, or not", "A horse! a horse!"]
    got = answers(model, tok, prompts, 10)
    for prompt, text in zip(prompts, got, strict=True):
        ids = torch.tensor([tok.encode(prompt)])
        new = generate(model, ids, 10, temperature=0.0, eos_id=eos)[0, ids.size(1) :]
        new = new.tolist()
        assert text == tok.decode(new[: new.index(eos)] if eos in new else new)


def test_a_prompt_that_fills_the_window_gets_an_empty_answer(setup):
    model, tok = setup
    full = "ROMEO: " + "my lord, " * 20
    assert len(tok.encode(full)) >= 32
    assert answers(model, tok, [full, "KING:"], 5)[0] == ""
