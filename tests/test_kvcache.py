"""The KV cache: prefill + one-token decode steps give the logits and the tokens of
recomputing the whole sequence, with learned positions and RoPE, with left padding,
and past the context window."""

import pytest
import torch

from shared.attention import position_ids_from_mask
from shared.generation import KVCache, generate, iter_tokens
from shared.model import GPT, GPTConfig

VOCAB = 41


def make(pos_encoding: str, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(VOCAB, 24, 2, 2, 32, pos_encoding=pos_encoding, dropout=0.0, **kw)
    return GPT(cfg).eval()


MODELS = {
    "learned": make("learned"),
    "rope": make("rope", norm="rmsnorm", ffn="swiglu"),
    "sinusoidal": make("sinusoidal"),
    "explicit": make("learned", attn_impl="explicit"),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_prefill_and_decode_logits_equal_full_forward(name):
    model = MODELS[name]
    idx = torch.randint(0, VOCAB, (2, 15), generator=torch.Generator().manual_seed(1))
    full = model(idx)
    cache = KVCache(model.config.n_layer, 24)
    with torch.no_grad():
        parts = [model(idx[:, :9], kv_cache=cache)]  # prefill 9 tokens
        for t in range(9, 15):  # then one at a time
            parts.append(model(idx[:, t : t + 1], kv_cache=cache))
    assert cache.length == 15
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("prompt_len,new", [(1, 10), (5, 19), (3, 40)])
def test_cached_greedy_tokens_equal_uncached(name, prompt_len, new):
    # (3, 40) runs past the 24-token window: the cache fills, then recomputation
    model = MODELS[name]
    g = torch.Generator().manual_seed(prompt_len)
    idx = torch.randint(0, VOCAB, (3, prompt_len), generator=g)
    a = generate(model, idx, new, temperature=0, use_cache=False)
    b = generate(model, idx, new, temperature=0, use_cache=True)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["learned", "rope"])
def test_cached_left_padded_batch_equals_one_by_one(name):
    model = MODELS[name]
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    width = max(map(len, prompts))
    idx = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batched = generate(model, idx, 12, temperature=0, attention_mask=mask)
    for row, p in enumerate(prompts):
        alone = generate(model, torch.tensor([p]), 12, temperature=0, use_cache=False)
        assert batched[row, width:].tolist() == alone[0, len(p) :].tolist()
    assert position_ids_from_mask(mask)[1].tolist() == [0, 0, 0, 0, 0, 1]


def test_seeded_sampling_is_the_same_with_and_without_cache():
    model = MODELS["rope"]
    idx = torch.tensor([[1, 2, 3]])
    runs = [
        generate(
            model, idx, 30, temperature=1.0, top_k=10,
            generator=torch.Generator().manual_seed(7), use_cache=c,
        )
        for c in (False, True)
    ]  # fmt: skip
    assert torch.equal(*runs)


def test_streaming_yields_the_generated_tokens_in_order():
    model = MODELS["learned"]
    idx = torch.tensor([[3, 4]])
    pieces = list(iter_tokens(model, idx, 8, temperature=0))
    assert len(pieces) == 8 and all(p.shape == (1, 1) for p in pieces)
    assert torch.equal(torch.cat([idx, *pieces], 1), generate(model, idx, 8, 0))


def test_cache_is_allocated_once_and_counts_its_bytes():
    model = MODELS["learned"]
    cache = KVCache(model.config.n_layer, 24)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), kv_cache=cache)
        k = cache.k
        model(torch.tensor([[4]]), kv_cache=cache)
    assert cache.k is k  # written in place, not reallocated
    assert cache.k.shape == (2, 1, 2, 24, 16)
    per_token = KVCache.bytes_per_token(model.config)
    assert per_token == 2 * 2 * 32 * 4  # k and v, 2 layers, width 32, fp32
    assert cache.nbytes == per_token * 24
    small = KVCache(model.config.n_layer, 6)
    with torch.no_grad(), pytest.raises(ValueError, match="KV cache holds 6"):
        model(torch.zeros(1, 4, dtype=torch.long), kv_cache=small)
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=small)


def test_learned_positions_stop_at_the_window():
    model = MODELS["learned"]
    cache = KVCache(model.config.n_layer, 48)  # room, but no position embedding
    with torch.no_grad(), pytest.raises(ValueError, match="position ids"):
        model(torch.zeros(1, 25, dtype=torch.long), kv_cache=cache)
