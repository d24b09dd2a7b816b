"""Chunked cross-entropy equals ``F.cross_entropy`` of the full logits, in value and
gradient, while never holding more than one chunk of logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shared.cross_entropy import chunked_cross_entropy


def data(n=37, c=16, v=101, dtype=torch.float64, ignore=5):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, c, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, c, generator=g, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.randperm(n, generator=g)[:ignore]] = -100
    return hidden, weight, targets


@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
@pytest.mark.parametrize("ignore", [5, 4])  # 32 rows count (1/32 is exact), or 33
def test_equals_cross_entropy_of_the_full_logits(chunk, ignore):
    hidden, weight, targets = data(ignore=ignore)
    want = F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100)
    got = chunked_cross_entropy(hidden, weight, targets, chunk)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    dw = torch.autograd.grad(want * 3, (hidden, weight))
    dg = torch.autograd.grad(got * 3, (hidden, weight))
    for a, b in zip(dg, dw, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_batched_shapes_and_float32():
    hidden, weight, targets = data(n=24, dtype=torch.float32)
    h3, t2 = hidden.reshape(4, 6, -1), targets.reshape(4, 6)
    want = F.cross_entropy((h3 @ weight.T).flatten(0, 1), t2.flatten())
    torch.testing.assert_close(chunked_cross_entropy(h3, weight, t2, 5), want)


def test_gradcheck():
    hidden, weight, targets = data(n=9, c=4, v=7, ignore=2)
    assert torch.autograd.gradcheck(
        lambda h, w: chunked_cross_entropy(h, w, targets, 4), (hidden, weight)
    )


def test_peak_memory_is_one_chunk_not_all_logits():
    from shared.memory import peak_memory_bytes

    n, v, chunk = 512, 8192, 32
    hidden, weight, targets = data(n=n, c=16, v=v, dtype=torch.float32)
    logits_bytes = n * v * 4

    def step(loss_fn):
        return lambda: torch.autograd.grad(loss_fn(), (hidden, weight))

    full = peak_memory_bytes(
        step(lambda: F.cross_entropy(hidden @ weight.T, targets)), torch.device("cpu")
    )
    chunked = peak_memory_bytes(
        step(lambda: chunked_cross_entropy(hidden, weight, targets, chunk)),
        torch.device("cpu"),
    )
    assert full >= 2 * logits_bytes  # logits and their gradient, at least
    # a few (chunk, V) blocks and the (V, C) weight gradient, nothing of size (n, V)
    assert chunked < 4 * chunk * v * 4 + 2 * v * 16 * 4 < logits_bytes / 2


def test_gpt_with_chunked_loss_trains_identically():
    from shared.model import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=97, context_length=16, n_layer=2, n_head=2, n_embd=16)
    idx = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for chunk in (0, 7):
        torch.manual_seed(0)
        model = GPT(cfg).double().set_chunked_loss(chunk)
        logits, loss = model(idx, idx)
        assert (logits is None) == (chunk > 0)
        loss.backward()
        results.append((loss, [p.grad for p in model.parameters()]))
    (loss0, g0), (loss1, g1) = results
    # GPT.forward takes its loss in float32 (even for a float64 model), the chunked
    # loss in the inputs' precision: equal to float32 rounding
    torch.testing.assert_close(loss1.float(), loss0, rtol=1e-6, atol=0)
    for a, b in zip(g1, g0, strict=True):  # the tied head/embedding included
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
