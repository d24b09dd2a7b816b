"""``shared.flash_attention``: attention by hand equal to PyTorch's, and
FlashAttention-2 equal to plain attention in value and gradient, saving O(T)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shared.flash_attention import (
    FlashAttention,
    flash_attention,
    scaled_dot_product_attention,
)


def qkv(t_q=24, t_k=24, d=8, shape=(2, 3), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda t: torch.randn(*shape, t, d, generator=g, dtype=dtype)  # noqa: E731
    return make(t_q), make(t_k), make(t_k)


@pytest.mark.parametrize("t_q, t_k", [(24, 24), (7, 24), (24, 7), (1, 1)])
def test_sdpa_by_hand_equals_pytorch(t_q, t_k):
    q, k, v = qkv(t_q, t_k)
    g = torch.Generator().manual_seed(1)
    bool_mask = torch.rand(t_q, t_k, generator=g) < 0.7
    bool_mask[:, 0] = True  # every query sees a key (all-masked rows are NaN)
    float_mask = torch.randn(2, 1, t_q, t_k, generator=g, dtype=torch.float64)
    for kwargs in [
        {},
        {"is_causal": True},
        {"attn_mask": bool_mask},
        {"attn_mask": float_mask},
        {"scale": 0.3},
    ]:
        torch.testing.assert_close(
            scaled_dot_product_attention(q, k, v, **kwargs),
            F.scaled_dot_product_attention(q, k, v, **kwargs),
            msg=lambda m, kw=kwargs: f"{kw}: {m}",
        )


def test_sdpa_refuses_a_mask_and_is_causal_together():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="not both"):
        scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(24, 24).bool(),
                                     is_causal=True)  # fmt: skip


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "t_q, t_k, block",
    [(64, 64, 16), (37, 37, 16), (37, 37, 64), (5, 37, 8), (37, 5, 8), (1, 1, 4)],
)
def test_flash_attention_equals_plain_attention(causal, t_q, t_k, block):
    q, k, v = (t.requires_grad_() for t in qkv(t_q, t_k))
    plain = scaled_dot_product_attention(q, k, v, is_causal=causal)
    flash = flash_attention(q, k, v, is_causal=causal, block_size=block)
    torch.testing.assert_close(flash, plain, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(plain)
    want = torch.autograd.grad(plain, (q, k, v), grad)
    got = torch.autograd.grad(flash, (q, k, v), grad)
    for name, a, b in zip("qkv", got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11, msg=f"d{name}")


def test_flash_attention_passes_gradcheck():
    q, k, v = (t.requires_grad_() for t in qkv(9, 9, d=4, shape=(2,)))
    for causal in (False, True):
        assert torch.autograd.gradcheck(
            lambda a, b, c, cz=causal: FlashAttention.apply(a, b, c, cz, 4, 4),
            (q, k, v),
        )


def test_flash_attention_saves_no_attention_matrix():
    # what autograd keeps for backward: q, k, v, the output and one log-sum-exp per
    # row; plain attention keeps (T, T) weights as well
    t, d = 256, 16
    q, k, v = (x.requires_grad_() for x in qkv(t, t, d=d, shape=(1, 2)))
    sizes = []

    def pack(x):
        sizes.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        flash_attention(q, k, v, is_causal=True)
    assert sorted(sizes) == sorted([2 * t] + [2 * t * d] * 4)
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        scaled_dot_product_attention(q, k, v, is_causal=True)
    assert max(sizes) == 2 * t * t
