"""``shared.evaluation.heads``: the copy alignment points at the token to copy, the
averaged scores read a designed attention pattern right, and ablating heads removes
exactly those heads (checked against zeroing their columns of ``c_proj``)."""

from __future__ import annotations

import copy

import pytest
import torch

from shared.chat import prompt_ids, with_chat_tokens
from shared.evaluation.heads import (
    ablate_heads,
    ablation_accuracy,
    copy_alignment,
    copy_attention,
    copy_map,
    single_head_ablations,
    top_heads,
)
from shared.evaluation.instructions import task_accuracy
from shared.generation import generate
from shared.model import GPT, GPTConfig
from shared.tasks import INSTRUCTIONS, Example, check_answer
from shared.tokenizer import course_tokenizer

# inputs whose tokens are all different and absent from the prompt template
INPUTS = ["my lord of York", "good king Henry"]


def repeat(text: str) -> Example:
    return Example("repeat", INSTRUCTIONS["repeat"], text, text, 0)


@pytest.fixture(scope="module")
def tok():
    return course_tokenizer()


def tiny(tok, cls=GPT, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(
        vocab_size=tok.vocab_size, context_length=64, n_layer=2, n_head=2, n_embd=16
    )
    return cls(cfg).double().eval()  # float64: a greedy token cannot flip on noise


# ---------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("chat", [False, True])
def test_each_source_holds_the_token_its_query_predicts(tok, chat):
    tokenizer = with_chat_tokens(tok) if chat else tok
    for text in [*INPUTS, "the king the king"]:
        a = copy_alignment(tokenizer, repeat(text))
        answer = tokenizer.encode(text)
        assert len(a.queries) == len(a.sources) == len(answer)
        start = a.queries[0] + 1  # the first answer token
        assert a.ids[start : start + len(answer)] == answer
        assert a.queries == list(range(start - 1, start - 1 + len(answer)))
        assert [a.ids[q + 1] for q in a.queries] == [a.ids[s] for s in a.sources]
        assert a.sources[-1] < start - 1  # inside the prompt, not the answer
        assert tokenizer.decode(a.ids[a.input_span[0] : a.input_span[1]]) == text


def test_an_answer_not_in_the_prompt_has_no_alignment(tok):
    count = Example("count", INSTRUCTIONS["count"], "my lord of York", "four", 0)
    assert copy_alignment(tok, count) is None
    with pytest.raises(ValueError, match="repeat task"):
        copy_attention(tiny(tok), tok, [count])


# ---------------------------------------------------------------------------- scores


class Designed(GPT):
    """A GPT whose attention maps are set by hand: layer 0 head 0 attends to the first
    occurrence of the *next* token (a perfect copy head on inputs of distinct tokens),
    head 1 spreads evenly over every allowed key, layer 1 looks only at position 0."""

    @torch.no_grad()
    def attention_maps(self, idx, attention_mask=None, position_ids=None):
        B, T = idx.shape
        maps = torch.zeros(self.config.n_layer, B, self.config.n_head, T, T)
        maps[0, :, 1] = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]
        maps[1, :, :, :, 0] = 1.0
        for b in range(B):
            for t in range(T):
                nxt = idx[b, t + 1] if t + 1 < T else -1
                first = (idx[b] == nxt).nonzero()
                s = int(first[0]) if len(first) and int(first[0]) <= t else 0
                maps[0, b, 0, t, s] = 1.0
        return maps


def test_scores_read_a_designed_copy_head(tok):
    count = Example("count", INSTRUCTIONS["count"], "good king Henry", "three", 0)
    examples = [repeat(t) for t in INPUTS] + [count]
    for text in INPUTS:  # the precondition of the designed copy head
        prompt = tok.encode(f"### Instruction:\n{INSTRUCTIONS['repeat']}\n")
        ids = tok.encode(text)
        assert len(set(ids)) == len(ids) and not set(ids) & set(prompt)
    r = copy_attention(tiny(tok, Designed), tok, examples, batch_size=2)
    assert (r["n_examples"], r["n_skipped"]) == (2, 1)
    assert r["n_queries"] == sum(len(tok.encode(t)) for t in INPUTS)
    assert r["copy"][0, 0] == pytest.approx(1.0)  # off by one position: 0
    assert r["control"][0, 0] == pytest.approx(0.0)
    # an even spread gives each input token the same share: no excess
    assert r["copy"][0, 1] == pytest.approx(float(r["control"][0, 1]))
    assert 0 < r["copy"][0, 1] < 0.1
    assert torch.equal(r["copy"][1], torch.zeros(2))
    assert top_heads(r["excess"], 2)[0] == (0, 0)
    m = copy_map(tiny(tok, Designed), tok, examples[:2], layer=0, head=0)
    size = min(len(tok.encode(t)) for t in INPUTS)
    torch.testing.assert_close(m, torch.eye(size))


def test_batching_does_not_change_the_scores(tok):
    model = tiny(tok)
    examples = [repeat(t) for t in [*INPUTS, "the king the king", "O Romeo"]]
    one = copy_attention(model, tok, examples, batch_size=1)
    together = copy_attention(model, tok, examples, batch_size=4)
    for key in ("per_example", "per_example_control"):
        torch.testing.assert_close(one[key], together[key])
    assert one["copy"].shape == (2, 2)


def test_top_heads_orders_by_score():
    scores = torch.tensor([[0.1, 0.7], [0.9, 0.2]])
    assert top_heads(scores, 3) == [(1, 0), (0, 1), (1, 1)]


# ---------------------------------------------------------------------------- ablation


def without_head(model: GPT, layer: int, head: int) -> GPT:
    """The reference: a copy whose ``c_proj`` ignores the head's slice of its input."""
    ref = copy.deepcopy(model)
    d = model.config.n_embd // model.config.n_head
    with torch.no_grad():
        ref.transformer.h[layer].attn.c_proj.weight[:, head * d : (head + 1) * d] = 0
    return ref


def test_ablating_a_head_equals_zeroing_its_columns_of_c_proj(tok):
    model = tiny(tok)
    idx = torch.tensor([tok.encode("ROMEO: my lord of York, good king Henry")])
    before = model(idx)
    with ablate_heads(model, []):
        assert torch.equal(model(idx), before)
    with ablate_heads(model, [(1, 0)]):
        ablated = model(idx)
    assert not torch.allclose(ablated, before)
    torch.testing.assert_close(ablated, without_head(model, 1, 0)(idx))
    assert torch.equal(model(idx), before)  # restored exactly
    with pytest.raises(RuntimeError, match="boom"), ablate_heads(model, [(0, 1)]):
        raise RuntimeError("boom")
    assert torch.equal(model(idx), before)  # restored after an error too
    with pytest.raises(ValueError, match="does not exist"):
        with ablate_heads(model, [(2, 0)]):
            pass


def test_a_layer_without_heads_outputs_only_the_bias(tok):
    model = tiny(tok)
    attn = model.transformer.h[0].attn
    with torch.no_grad():
        attn.c_proj.bias.normal_()  # a bias of zeros would pass by accident
    seen = []
    handle = attn.register_forward_hook(lambda mod, args, out: seen.append(out))
    idx = torch.tensor([tok.encode("my lord of York")])
    with ablate_heads(model, [(0, 0), (0, 1)]):
        model(idx)
    handle.remove()
    torch.testing.assert_close(seen[0], attn.c_proj.bias.expand_as(seen[0]))


def own_answer(model: GPT, tok, text: str) -> Example:
    """A repeat example whose answer is what ``model`` says (greedy), cut to a
    prefix that encodes back to the same ids: the model gets it right."""
    prompt = torch.tensor([prompt_ids(tok, INSTRUCTIONS["repeat"], text)])
    ids = generate(model, prompt, 8, temperature=0.0)[0, prompt.size(1) :].tolist()
    k = max(k for k in range(1, 9) if tok.encode(tok.decode(ids[:k])) == ids[:k])
    return Example("repeat", INSTRUCTIONS["repeat"], text, tok.decode(ids[:k]), 0)


def test_ablation_accuracy_holds_in_generation(tok):
    model = tiny(tok)
    # slack -1: a budget of exactly the answer's length (the model does not stop)
    examples = [own_answer(model, tok, t) for t in INPUTS]
    sweep = single_head_ablations(model, tok, examples, slack=-1)
    assert sweep["baseline"] == 1.0 and all(sweep["baseline_correct"])
    run = ablation_accuracy(model, tok, examples, [(0, 0)], slack=-1)
    _, ref = task_accuracy(without_head(model, 0, 0), tok, examples, slack=-1)
    assert run["responses"] == ref  # the KV-cache steps are ablated too
    pairs = zip(examples, ref, strict=True)
    assert run["correct"] == [check_answer(e, r) for e, r in pairs]
    assert not all(run["correct"])  # this head matters to this model
    assert sweep["correct"].shape == (2, 2, 2)
    assert sweep["correct"][0, 0].tolist() == run["correct"]
    assert sweep["accuracy"][0, 0] == sum(run["correct"]) / 2
