"""Speculative decoding: greedy output identical to ``generate`` whatever the draft
(random, the target itself, always wrong), every cached pass equal to an uncached
one (rollback), sampled tokens distributed exactly as the target's (and the same
check failing for two wrong acceptance rules), eos, errors, and the cost model."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import shared.generation.speculative as speculative
from shared.generation import (
    KVCache,
    acceptance_probability,
    break_even_cost_ratio,
    expected_speedup,
    expected_tokens_per_pass,
    generate,
    next_token_distribution,
    speculative_generate,
)
from shared.model import GPT, GPTConfig
from shared.pretrained import load_course_model

VOCAB, CONTEXT = 29, 32


def tiny(seed: int, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_head=2, n_embd=16) | kw
    return GPT(GPTConfig(VOCAB, CONTEXT, **cfg)).eval()


class Negated(nn.Module):
    """A draft whose greedy guess is never right: the target's argmin."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, idx: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
        return -self.model(idx, kv_cache=kv_cache)


TARGET = tiny(0)
DRAFTS = {
    # another shape: one layer, RoPE, one key/value head (its own cache layout)
    "random": tiny(1, n_layer=1, pos_encoding="rope", n_kv_head=1),
    "target": TARGET,  # every guess right: the bonus-token path every round
    "wrong": Negated(TARGET),  # every guess wrong: one token per target pass
}
PROMPTS = [[1], [3, 4, 5], list(range(2, 13))]


@pytest.mark.parametrize("k", [1, 2, 4, 7])
@pytest.mark.parametrize("name", list(DRAFTS))
def test_greedy_tokens_equal_generate(name, k):
    new = 20
    for prompt in PROMPTS:
        idx = torch.tensor([prompt])
        expected = generate(TARGET, idx, new, temperature=0)
        out, stats = speculative_generate(
            TARGET, DRAFTS[name], idx, new, k=k, return_stats=True
        )
        assert torch.equal(out, expected), prompt
        assert stats.new_tokens == new and stats.draft_passes == stats.proposed
        if name == "target":
            assert stats.accepted == stats.proposed > 0 and stats.rejected == 0
            assert stats.target_passes == math.ceil(new / (k + 1))
        if name == "wrong":
            assert stats.accepted == 0 and stats.target_passes == new


def test_greedy_equals_uncached_generate_and_restores_training_mode():
    idx = torch.tensor([PROMPTS[1]])
    draft = DRAFTS["random"]
    TARGET.train(), draft.train()
    try:
        out = speculative_generate(TARGET, draft, idx, 25, k=3)
        assert TARGET.training and draft.training
    finally:
        TARGET.eval(), draft.eval()
    assert torch.equal(out, generate(TARGET, idx, 25, temperature=0, use_cache=False))


class Recorder(nn.Module):
    """Passes calls through to ``model`` and keeps (start, tokens fed, logits)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.config, self.calls = model, model.config, []

    def forward(self, idx: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
        start = kv_cache.length
        logits = self.model(idx, kv_cache=kv_cache)
        self.calls.append((start, idx[0].tolist(), logits[0]))
        return logits


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_cached_pass_equals_an_uncached_pass_on_the_final_text(temperature):
    # after each rollback a model must see exactly the kept tokens at the right
    # positions: its logits then equal those of one uncached pass over the output
    k = 3
    target, draft = Recorder(TARGET), Recorder(DRAFTS["random"])
    g = torch.Generator().manual_seed(0)
    out, stats = speculative_generate(
        target, draft, torch.tensor([PROMPTS[1]]), 25, k=k,
        temperature=temperature, generator=g, return_stats=True,
    )  # fmt: skip
    assert 0 < stats.rejected < stats.target_passes  # rollbacks did happen
    seq = out[0].tolist()
    for rec in (target, draft):
        full = rec.model(out)[0]
        covered = []
        for start, fed, logits in rec.calls:
            n = 0  # rows whose tokens are all in the output: the kept ones
            while n < len(fed) and fed[n] == seq[start + n]:
                n += 1
            torch.testing.assert_close(logits[:n], full[start : start + n])
            covered += range(start, start + n)
        assert covered == list(range(len(covered)))  # each position once, in order
        if rec is target:  # every token but the last one went through the target
            assert len(covered) == len(seq) - 1
    # after the prompt, the target reads the last token and k guesses, no more
    assert all(len(fed) <= k + 1 for _, fed, _ in target.calls[1:])
    assert all(len(fed) <= 2 for _, fed, _ in draft.calls[1:])


@pytest.mark.parametrize("name", ["random", "target"])
def test_eos_stops_like_generate(name):
    idx = torch.tensor([PROMPTS[0]])
    free = generate(TARGET, idx, 20, temperature=0)[0, 1:].tolist()
    eos = free[4]  # a token the greedy text reaches (maybe earlier than here)
    expected = generate(TARGET, idx, 20, temperature=0, eos_id=eos)
    out = speculative_generate(TARGET, DRAFTS[name], idx, 20, k=4, eos_id=eos)
    assert torch.equal(out, expected)
    assert out[0, -1] == eos and out.size(1) <= 6


def test_sampling_stops_at_the_first_eos():
    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        out = speculative_generate(
            TARGET, DRAFTS["random"], torch.tensor([[1]]), 30, k=4,
            temperature=1.0, eos_id=2, generator=g,
        )  # fmt: skip
        new = out[0, 1:].tolist()
        assert 2 not in new[:-1] and (new[-1] == 2 or len(new) == 30)


def test_clear_errors():
    draft = DRAFTS["random"]
    with pytest.raises(ValueError, match="one sequence"):
        speculative_generate(TARGET, draft, torch.tensor([[1], [2]]), 5)
    with pytest.raises(ValueError, match="context window"):
        speculative_generate(TARGET, draft, torch.ones(1, 30, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="share a tokenizer"):
        speculative_generate(TARGET, _other(), torch.tensor([[1]]), 5)
    with pytest.raises(ValueError, match="k >= 1"):
        speculative_generate(TARGET, draft, torch.tensor([[1]]), 5, k=0)
    # exactly full: prompt + new - 1 = context (the last token is never fed back)
    idx = torch.randint(0, VOCAB, (1, 29), generator=torch.Generator().manual_seed(0))
    out = speculative_generate(TARGET, draft, idx, 4, k=4)
    assert torch.equal(out, generate(TARGET, idx, 4, temperature=0))
    assert torch.equal(speculative_generate(TARGET, draft, idx, 0), idx)


def _other() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(VOCAB + 1, CONTEXT, 1, 2, 16))


# --------------------------------------------- the distribution of sampled tokens


class TableLM(nn.Module):
    """A language model as a random table, logits[position, previous token]: fast
    enough to sample thousands of times, and a wrong cache rollback (a position off)
    changes its distribution."""

    def __init__(self, seed: int, vocab: int = 8, context: int = 8) -> None:
        super().__init__()
        self.config = SimpleNamespace(
            vocab_size=vocab, context_length=context, n_layer=1
        )
        g = torch.Generator().manual_seed(seed)
        self.table = 1.5 * torch.randn(context, vocab, vocab, generator=g)

    def forward(self, idx: torch.Tensor, kv_cache: KVCache | None = None):
        start = 0 if kv_cache is None else kv_cache.length
        if kv_cache is not None:
            kv_cache.advance(idx.size(1))
        return self.table[torch.arange(start, start + idx.size(1)), idx]


@torch.no_grad()
def exact_marginals(model, prompt, n, **settings) -> torch.Tensor:
    """(n, V): the model's exact distribution of each of the next n tokens, summed
    over every continuation (uncached, all continuations in one batch)."""
    seqs, weight, out = torch.tensor([prompt]), torch.ones(1), []
    vocab = model.config.vocab_size
    for _ in range(n):
        dist = next_token_distribution(model(seqs)[:, -1], **settings)
        joint = weight[:, None] * dist
        out.append(joint.sum(0))
        ext = torch.arange(vocab).repeat(len(seqs))[:, None]
        seqs = torch.cat([seqs.repeat_interleave(vocab, 0), ext], 1)
        weight = joint.flatten()
    return torch.stack(out)


RUNS = 2000
# chi-square: 40.5 is the 1e-6 tail for 7 degrees of freedom (scipy.stats.chi2.isf),
# above the 1e-6 tail for fewer: a correct sampler fails about once in a million
THRESHOLD = 40.5
SETTINGS = [dict(temperature=1.0), dict(temperature=0.7, top_k=5, top_p=0.9)]


def chi_square_by_position(target, draft, settings, runs=RUNS) -> list[float]:
    prompt, n = [3, 1], 3
    p = exact_marginals(target, prompt, n, **settings)
    counts = torch.zeros_like(p)
    g = torch.Generator().manual_seed(1234)
    for _ in range(runs):
        out = speculative_generate(
            target, draft, torch.tensor([prompt]), n, k=2, generator=g, **settings
        )
        counts[torch.arange(n), out[0, len(prompt) :]] += 1
    return [
        chi_square(c, runs * e) if c[e == 0].sum() == 0 else math.inf  # impossible
        for c, e in zip(counts, p, strict=True)
    ]


def chi_square(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's statistic; cells expecting fewer than 5 are pooled into one."""
    small = expected < 5
    counts = torch.cat([counts[~small], counts[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected > 0
    return float(((counts - expected)[keep] ** 2 / expected[keep]).sum())


TABLE_TARGET, TABLE_DRAFT = TableLM(0), TableLM(1)


def test_the_table_models_differ_enough_for_the_test_to_mean_something():
    p = exact_marginals(TABLE_TARGET, [3, 1], 1)[0]
    q = exact_marginals(TABLE_DRAFT, [3, 1], 1)[0]
    assert 0.3 < 0.5 * (p - q).abs().sum() < 0.8  # total variation


@pytest.mark.parametrize("settings", SETTINGS)
def test_sampled_tokens_follow_the_targets_distribution(settings):
    # the first, second and third token of 2000 runs (k=2): drafted-and-accepted,
    # resampled from the residual and bonus tokens all occur
    stats = chi_square_by_position(TABLE_TARGET, TABLE_DRAFT, settings)
    assert max(stats) < THRESHOLD, stats


def accept_everything(p, q, proposal, generator=None, greedy=False):
    """Wrong: the draft's tokens as they come (the output follows q, not p)."""
    return proposal + [speculative._draw(p[len(proposal)], generator)]


def resample_from_p(p, q, proposal, generator=None, greedy=False):
    """Wrong: on rejection sample from p instead of norm(max(0, p - q))."""
    for i, token in enumerate(proposal):
        if float(torch.rand((), generator=generator)) * q[i, token] >= p[i, token]:
            return proposal[:i] + [speculative._draw(p[i], generator)]
    return proposal + [speculative._draw(p[len(proposal)], generator)]


@pytest.mark.parametrize("rule", [accept_everything, resample_from_p])
def test_the_distribution_test_catches_a_wrong_acceptance_rule(rule, monkeypatch):
    monkeypatch.setattr(speculative, "verify_draft", rule)
    stats = chi_square_by_position(TABLE_TARGET, TABLE_DRAFT, SETTINGS[0])
    assert max(stats) > 2 * THRESHOLD, stats


def test_sampling_with_gpts_matches_the_target_and_draft_equal_target_accepts_all():
    torch.manual_seed(5)
    target, draft = (GPT(GPTConfig(8, 8, 1, 2, 16)).eval() for _ in range(2))
    with torch.no_grad():  # sharper distributions than the 0.02 initialisation
        for m in (target, draft):
            m.lm_head.weight.mul_(10)
    p, q = (exact_marginals(m, [3, 1], 1)[0] for m in (target, draft))
    assert 0.5 * (p - q).abs().sum() > 0.3  # far apart: many rejections
    stats = chi_square_by_position(target, draft, dict(temperature=1.0), runs=1500)
    assert max(stats) < THRESHOLD, stats
    g = torch.Generator().manual_seed(0)
    _, s = speculative_generate(
        target, target, torch.tensor([[1]]), 7, k=3, temperature=1.0, generator=g,
        return_stats=True,
    )  # fmt: skip
    assert s.accepted == s.proposed == 5 and s.target_passes == 2  # 4 + 3 tokens


# ------------------------------------------------------------------ cost model


def test_acceptance_probability_is_one_minus_total_variation():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, 11, generator=g), torch.randn(3, 5, 11, generator=g)
    p, q = a.softmax(-1), b.softmax(-1)
    tv = 0.5 * (p - q).abs().sum(-1)
    torch.testing.assert_close(acceptance_probability(a, b), 1 - tv)
    agree = (a.argmax(-1) == b.argmax(-1)).float()
    assert torch.equal(acceptance_probability(a, b, temperature=0), agree)
    ones = torch.ones(3, 5)
    torch.testing.assert_close(acceptance_probability(a, a, 0.8, top_k=3), ones)


def test_acceptance_probability_predicts_the_loops_acceptance():
    # one drafted token per run: accepted with probability sum_x min(p(x), q(x))
    prompt, runs = torch.tensor([[3, 1]]), 2000
    logits = [m(prompt)[0, -1] for m in (TABLE_TARGET, TABLE_DRAFT)]
    predicted = float(acceptance_probability(*logits))
    g, accepted = torch.Generator().manual_seed(0), 0
    for _ in range(runs):
        _, s = speculative_generate(
            TABLE_TARGET, TABLE_DRAFT, prompt, 2, k=1, temperature=1.0,
            generator=g, return_stats=True,
        )  # fmt: skip
        accepted += s.accepted
    assert abs(accepted / runs - predicted) < 0.06  # 5 standard errors


def test_cost_model():
    assert expected_tokens_per_pass(0.0, 4) == 1.0
    assert expected_tokens_per_pass(1.0, 4) == 5.0
    assert expected_tokens_per_pass(0.5, 2) == pytest.approx(1.75)
    assert expected_speedup(0.5, 2, 0.1) == pytest.approx(1.75 / 1.2)
    for alpha, k in [(0.3, 1), (0.7, 4), (0.9, 6)]:
        assert expected_speedup(alpha, k, break_even_cost_ratio(alpha, k)) == (
            pytest.approx(1.0)
        )


def test_the_shipped_draft_speeds_the_shipped_model_in_target_passes():
    target, tok, _ = load_course_model("cpu")
    draft, _, _ = load_course_model("cpu", name="draft")
    idx = torch.tensor([tok.encode("ROMEO:\n")])
    out, stats = speculative_generate(target, draft, idx, 60, k=4, return_stats=True)
    assert torch.equal(out, generate(target, idx, 60, temperature=0))
    # a random draft agrees about 3% of the time; the distilled one far more often
    assert stats.alpha > 0.4 and stats.tokens_per_target_pass > 1.5
