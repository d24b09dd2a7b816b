"""Activation checkpointing by hand (``shared.recompute``) gives the gradients of no
checkpointing and of ``torch.utils.checkpoint`` bit for bit, dropout included, and
keeps fewer activations."""

from __future__ import annotations

import pytest
import torch

from shared.model import GPT, GPTConfig
from shared.recompute import checkpoint

CFG = GPTConfig(vocab_size=97, context_length=32, n_layer=3, n_head=4, n_embd=32,
                dropout=0.1)  # fmt: skip


def grads_of(n_blocks, part="block", impl="torch", seed=0):
    torch.manual_seed(0)
    model = GPT(CFG).set_activation_checkpointing(n_blocks, part=part, impl=impl)
    model.train()
    idx = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(seed)  # the dropout masks
    _, loss = model(idx, idx)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "n_blocks, part, impl",
    [(3, "block", "course"), (2, "block", "course"), (3, "attention", "course"),
     (3, "block", "torch"), (3, "attention", "torch")],
)  # fmt: skip
def test_recomputed_gradients_are_bit_identical(n_blocks, part, impl):
    loss, want = grads_of(0)
    got_loss, got = grads_of(n_blocks, part, impl)
    assert torch.equal(loss, got_loss)
    for name, g in want.items():
        assert torch.equal(got[name], g), name


def test_dropout_is_replayed_not_redrawn():
    # without restoring the random state the recomputed block would drop other
    # units than the forward pass did, and the gradients would differ
    _, a = grads_of(3, impl="course", seed=0)
    _, b = grads_of(3, impl="course", seed=1)
    assert not torch.equal(a["transformer.h.0.mlp.c_fc.weight"],
                           b["transformer.h.0.mlp.c_fc.weight"])  # fmt: skip


def saved_numel(n_blocks, part="block", impl="course"):
    """Elements autograd keeps for backward, the parameters themselves left out."""
    model = GPT(CFG).set_activation_checkpointing(n_blocks, part=part, impl=impl)
    model.train()
    params = {p.data_ptr() for p in model.parameters()}
    sizes = []

    def pack(x):
        if x.data_ptr() not in params:  # a weight (or its transpose) costs nothing
            sizes.append(x.numel())
        return x

    idx = torch.zeros(4, 32, dtype=torch.long)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        model(idx, idx)
    return sum(sizes)


def test_checkpointing_keeps_fewer_activations():
    plain, selective, full = saved_numel(0), saved_numel(3, "attention"), saved_numel(3)
    assert full < selective < plain


def test_checkpoint_of_a_function_with_non_tensor_arguments():
    x = torch.randn(5, 3, requires_grad=True)
    w = torch.randn(3, 3, requires_grad=True)
    f = lambda a, scale, bias: torch.tanh(a @ w * scale) + (0 if bias is None else bias)  # noqa: E731
    y = checkpoint(f, x, 2.0, None)
    y.sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad, w.grad = None, None
    f(x, 2.0, None).sum().backward()
    assert torch.equal(gx, x.grad) and torch.equal(gw, w.grad)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="part must be"):
        GPT(CFG).set_activation_checkpointing(1, part="mlp")
    with pytest.raises(ValueError, match="impl one of"):
        GPT(CFG).set_activation_checkpointing(1, impl="jax")


@pytest.mark.parametrize("part", ["block", "attention"])
def test_recomputation_under_bf16_autocast_matches_torch(part):
    # backward runs outside the autocast block: the recompute must re-enter it, or it
    # computes in fp32 and the gradients differ (by up to 4e-4 before the fix)
    def grads(impl):
        torch.manual_seed(0)
        model = GPT(CFG).set_activation_checkpointing(3, part=part, impl=impl)
        idx = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(idx, idx)
        loss.backward()
        return [p.grad for p in model.parameters()]

    for a, b in zip(grads("course"), grads("torch"), strict=True):
        assert torch.equal(a, b)
