"""Grouped-query and multi-query attention (chapter 9): fewer key/value heads, each
shared by a group of query heads, in the model, the KV cache and generation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shared.attention import MultiHeadAttention, repeat_kv
from shared.generation import KVCache, generate
from shared.model import GPT, GPTConfig


def config(n_kv_head: int | None, **overrides) -> GPTConfig:
    base = dict(vocab_size=64, context_length=32, n_layer=2, n_head=4, n_embd=32)
    return GPTConfig(**base, n_kv_head=n_kv_head, **overrides)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_qkv_projection_shrinks_with_kv_heads(n_kv_head):
    attn = MultiHeadAttention.from_config(config(n_kv_head))
    head_dim = 32 // 4
    assert attn.c_attn.weight.shape == (32 + 2 * n_kv_head * head_dim, 32)


def test_default_is_multi_head_with_gpt2_shapes():
    cfg = config(None)
    assert cfg.n_kv_head == cfg.n_head
    attn = MultiHeadAttention.from_config(cfg)
    assert attn.c_attn.weight.shape == (3 * 32, 32)  # GPT-2's fused layout


@pytest.mark.parametrize("n_kv_head", [0, 3, 5])
def test_kv_heads_must_divide_query_heads(n_kv_head):
    with pytest.raises(ValueError, match="n_kv_head"):
        config(n_kv_head)


def test_repeat_kv_gives_each_group_its_head():
    x = torch.arange(2 * 3 * 1 * 1).float().view(2, 3, 1, 1)
    out = repeat_kv(x, 2)
    assert out.shape == (2, 6, 1, 1)
    # query heads 0,1 read kv head 0; 2,3 read head 1; 4,5 read head 2
    assert out[0, :, 0, 0].tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("n_kv_head", [2, 1])
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_gqa_equals_mha_with_repeated_key_value_weights(n_kv_head, pos):
    """A GQA model computes what a multi-head model computes whose key and value
    projections repeat each shared head for its group of query heads."""
    torch.manual_seed(0)
    gqa = GPT(config(n_kv_head, pos_encoding=pos)).eval()
    mha = GPT(config(None, pos_encoding=pos)).eval()
    state = gqa.state_dict()
    groups, head_dim, kv_dim = 4 // n_kv_head, 8, n_kv_head * 8
    for name, w in list(state.items()):
        if name.endswith("attn.c_attn.weight") or name.endswith("attn.c_attn.bias"):
            q, k, v = w.split([32, kv_dim, kv_dim])
            k, v = (
                z.unflatten(0, (n_kv_head, head_dim))
                .repeat_interleave(groups, 0)
                .flatten(0, 1)
                for z in (k, v)
            )
            state[name] = torch.cat([q, k, v])
    mha.load_state_dict(state)
    idx = torch.randint(0, 64, (3, 20))
    torch.testing.assert_close(gqa(idx), mha(idx), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_gqa_attention_equals_pytorch_enable_gqa(n_kv_head):
    """The course's head sharing equals PyTorch's own ``enable_gqa`` kernel."""
    torch.manual_seed(1)
    attn = MultiHeadAttention(32, 4, 32, n_kv_head=n_kv_head, impl="explicit").eval()
    x = torch.randn(2, 10, 32)
    q, k, v = attn.c_attn(x).split([32, n_kv_head * 8, n_kv_head * 8], dim=2)
    q = q.view(2, 10, 4, 8).transpose(1, 2)
    k, v = (z.view(2, 10, n_kv_head, 8).transpose(1, 2) for z in (k, v))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref = attn.c_proj(ref.transpose(1, 2).reshape(2, 10, 32))
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_cached_generation_equals_uncached(n_kv_head, pos):
    torch.manual_seed(2)
    model = GPT(config(n_kv_head, pos_encoding=pos))
    idx = torch.randint(0, 64, (2, 5))
    cached = generate(model, idx, 20, temperature=0.0)
    uncached = generate(model, idx, 20, temperature=0.0, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_cache_holds_only_the_kv_heads(n_kv_head):
    cfg = config(n_kv_head)
    model = GPT(cfg).eval()
    cache = KVCache(cfg.n_layer, 16)
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 6)), kv_cache=cache)
    assert cache.k.shape == (cfg.n_layer, 1, n_kv_head, 16, 32 // 4)
    assert cache.nbytes == 16 * KVCache.bytes_per_token(cfg)
    # 2 (k and v) x layers x kv heads x head dim x 4 bytes
    assert KVCache.bytes_per_token(cfg) == 2 * 2 * n_kv_head * 8 * 4


def test_bytes_per_token_at_gpt2_shape():
    """GPT-2-124M: 36 KiB per token with 12 key/value heads, 12 KiB with 4, 3 with 1."""
    for n_kv, kib in [(12, 72), (4, 24), (1, 6)]:
        cfg = GPTConfig.gpt2("124M", n_kv_head=n_kv)
        assert KVCache.bytes_per_token(cfg) == kib * 1024  # fp32
        assert KVCache.bytes_per_token(cfg, bytes_per_value=2) == kib * 512


def test_truncate_rolls_back_the_cache():
    torch.manual_seed(3)
    model = GPT(config(2)).eval()
    idx = torch.randint(0, 64, (1, 9))
    full = KVCache(2, 16)
    rolled = KVCache(2, 16)
    with torch.no_grad():
        want = model(idx[:, 6:], kv_cache=(model(idx[:, :6], kv_cache=full), full)[1])
        model(idx[:, :6], kv_cache=rolled)
        model(torch.randint(0, 64, (1, 4)), kv_cache=rolled)  # rejected tokens
        rolled.truncate(6)
        got = model(idx[:, 6:], kv_cache=rolled)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError):
        rolled.truncate(10)
