"""Attention: explicit math == fused path == PyTorch's scaled_dot_product_attention."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from shared.attention import (
    IMPLS,
    MultiHeadAttention,
    apply_rope,
    causal_attention,
    causal_mask,
    rope_cache,
)

SHAPES = [(1, 1, 1, 4), (2, 3, 5, 8), (3, 4, 17, 16), (1, 2, 64, 32)]


@pytest.mark.parametrize("shape", SHAPES)
def test_explicit_equals_fused_equals_sdpa(shape):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    explicit = causal_attention(q, k, v, impl="explicit")
    fused = causal_attention(q, k, v, impl="fused")
    torch.testing.assert_close(explicit, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)


def test_explicit_matches_hand_computation():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(5, 4, generator=g) for _ in range(3))
    out, w = causal_attention(q, k, v, impl="explicit", return_weights=True)
    for i in range(5):  # row i: softmax over keys 0..i only
        s = torch.stack([q[i] @ k[j] / math.sqrt(4) for j in range(i + 1)])
        torch.testing.assert_close(w[i, : i + 1], torch.softmax(s, 0))
        torch.testing.assert_close(out[i], torch.softmax(s, 0) @ v[: i + 1])


def test_masked_positions_have_exactly_zero_weight():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g) for _ in range(3))
    _, w = causal_attention(q, k, v, impl="explicit", return_weights=True)
    future = causal_mask(9, 9)
    assert torch.all(w[..., future] == 0.0)
    assert torch.all(w[..., ~future] > 0.0)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 9))


def test_queries_over_cached_keys_align_bottom_right():
    # the last 3 queries over 7 keys must equal the last 3 rows of full attention
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 7, 8, generator=g) for _ in range(3))
    full = causal_attention(q, k, v, impl="explicit")
    for impl in ("explicit", "fused"):
        part = causal_attention(q[:, :, -3:], k, v, impl=impl)
        torch.testing.assert_close(part, full[:, :, -3:], atol=1e-5, rtol=1e-5)


def _module(impl="fused", dropout=0.0, rope=False):
    torch.manual_seed(0)
    return MultiHeadAttention(32, 4, 16, dropout=dropout, rope=rope, impl=impl)


@pytest.mark.parametrize("rope", [False, True])
def test_module_paths_agree(rope):
    m = _module(rope=rope).eval()
    x = torch.randn(3, 11, 32)
    fused = m(x, impl="fused")
    explicit, w = m(x, return_weights=True)
    torch.testing.assert_close(m(x, impl="explicit"), fused, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-5)
    assert w.shape == (3, 4, 11, 11)
    assert torch.all(w[..., causal_mask(11, 11)] == 0)


def test_module_matches_sdpa_with_same_weights():
    m = _module().eval()
    x = torch.randn(2, 6, 32)
    q, k, v = m.c_attn(x).split(32, dim=2)
    q, k, v = (z.view(2, 6, 4, 8).transpose(1, 2) for z in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected = m.c_proj(y.transpose(1, 2).reshape(2, 6, 32))
    torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["explicit", "fused"])
def test_dropout_off_in_eval_on_in_train(impl):
    m = _module(impl=impl, dropout=0.5)
    x = torch.randn(2, 8, 32)
    m.eval()
    torch.testing.assert_close(m(x), m(x))  # deterministic in eval
    torch.testing.assert_close(m(x), _module(impl=impl).eval()(x))  # == no dropout
    m.train()
    assert not torch.allclose(m(x), m(x))


def test_causality_future_tokens_do_not_change_the_past():
    m = _module().eval()
    x = torch.randn(1, 10, 32)
    y = m(x)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(1, 4, 32)
    torch.testing.assert_close(m(x2)[:, :6], y[:, :6])


def test_built_from_config():
    cfg = SimpleNamespace(
        n_embd=24,
        n_head=3,
        context_length=8,
        dropout=0.0,
        bias=False,
        pos_encoding="rope",
        attn_impl="explicit",
        rope_base=10000.0,
    )
    m = MultiHeadAttention.from_config(cfg)
    assert m.rope and m.impl == "explicit" and m.c_attn.bias is None
    assert m(torch.randn(2, 8, 24)).shape == (2, 8, 24)


def test_rope_is_a_rotation_with_relative_scores():
    cos, sin = rope_cache(8, 32)
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(8, generator=g), torch.randn(8, generator=g)
    # rotation keeps norms; the score depends only on the distance between positions
    rq = apply_rope(q.expand(32, 8), cos, sin)
    rk = apply_rope(k.expand(32, 8), cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(32))
    torch.testing.assert_close(rq[5] @ rk[2], rq[20] @ rk[17], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rq[0], q)  # position 0 is not rotated


def test_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(30, 4, 8)
    with pytest.raises(ValueError, match="impl"):
        MultiHeadAttention(32, 4, 8, impl="flash")
    q = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="explicit"):
        causal_attention(q, q, q, impl="fused", return_weights=True)


def test_too_long_sequence():
    for rope in (False, True):
        m = MultiHeadAttention(8, 2, context_length=8, rope=rope)
        m(torch.randn(1, 8, 8))  # exactly the context is fine
        with pytest.raises(ValueError, match="longer than context_length=8"):
            m(torch.randn(1, 10, 8))


# ---------------------------------------------------------------- masks (padding etc.)


def _qkv(b=2, h=3, t=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, d, generator=g) for _ in range(3)]


def _padding(lengths, t):
    """(B, 1, 1, T) key mask for left-padded rows: True on the last ``n`` positions."""
    keep = torch.arange(t)[None, :] >= (t - torch.tensor(lengths))[:, None]
    return keep[:, None, None, :]


@pytest.mark.parametrize("kind", ["padding", "random"])
def test_masked_attention_explicit_equals_fused_equals_sdpa(kind):
    q, k, v = _qkv()
    if kind == "padding":
        mask = _padding([6, 3], 6)
    else:  # any boolean mask, per head
        g = torch.Generator().manual_seed(1)
        mask = torch.rand(2, 3, 6, 6, generator=g) > 0.3
        mask[..., 0] = True  # every query may see at least the first key
    reference = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask & ~causal_mask(6, 6)
    )
    explicit = causal_attention(q, k, v, attn_mask=mask, impl="explicit")
    fused = causal_attention(q, k, v, attn_mask=mask, impl="fused")
    torch.testing.assert_close(explicit, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)


def test_all_true_mask_is_plain_causal_attention():
    q, k, v = _qkv()
    full = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    for impl in IMPLS:
        torch.testing.assert_close(
            causal_attention(q, k, v, attn_mask=full, impl=impl),
            causal_attention(q, k, v, impl=impl),
        )


def test_fully_masked_padding_rows_are_zero_not_nan():
    q, k, v = _qkv()
    mask = _padding([6, 2], 6)  # row 1: queries 0-3 are padding and see no key
    for impl in IMPLS:
        out = causal_attention(q, k, v, attn_mask=mask, impl=impl)
        assert not out.isnan().any()
        assert (out[1, :, :4] == 0).all()
        # the real tokens attend only to real tokens: as if the padding were absent
        alone = causal_attention(q[1:, :, 4:], k[1:, :, 4:], v[1:, :, 4:], impl=impl)
        torch.testing.assert_close(out[1:, :, 4:], alone, atol=1e-5, rtol=1e-5)
    _, w = causal_attention(
        q, k, v, attn_mask=mask, impl="explicit", return_weights=True
    )
    assert not w.isnan().any() and (w[1, :, 4:, :4] == 0).all()
    torch.testing.assert_close(w[1, :, 4:].sum(-1), torch.ones(3, 2))


def test_masked_gradients_have_no_nan():
    q, k, v = (t.requires_grad_() for t in _qkv())
    mask = _padding([6, 2], 6)
    for impl in IMPLS:
        causal_attention(q, k, v, attn_mask=mask, impl=impl).sum().backward()
        assert not any(t.grad.isnan().any() for t in (q, k, v))


def test_mask_must_be_boolean():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="boolean"):
        causal_attention(q, k, v, attn_mask=torch.ones(6, 6))


def test_module_mask_and_rope_positions_for_left_padding():
    # a left-padded row with shifted positions gives the same outputs as the
    # unpadded row: the padding is invisible and RoPE sees positions 0..n-1
    torch.manual_seed(0)
    for impl in IMPLS:
        m = MultiHeadAttention(32, 4, 16, rope=True, impl=impl).eval()
        x = torch.randn(1, 5, 32)
        padded = torch.cat([torch.randn(1, 3, 32), x], dim=1)
        keep = torch.tensor([[False] * 3 + [True] * 5])
        pos = (keep.long().cumsum(-1) - 1).clamp(min=0)
        out = m(padded, attn_mask=keep[:, None, None, :], position_ids=pos)
        torch.testing.assert_close(out[:, 3:], m(x), atol=1e-5, rtol=1e-5)


def test_rope_position_ids_beyond_the_context_are_refused():
    m = MultiHeadAttention(8, 2, context_length=8, rope=True)
    with pytest.raises(ValueError, match=r"position ids must be in \[0, 8\)"):
        m(torch.randn(1, 2, 8), position_ids=torch.tensor([7, 8]))
