"""The KV cache: prefill + one-token decode steps give the logits and the tokens of
recomputing the whole sequence, with learned positions and RoPE, with left padding,
and past the context window."""

import pytest
import torch

from shared.attention import (
    DECODE_ROWS,
    apply_linear,
    decode_copy_bytes,
    position_ids_from_mask,
    set_decode_copies,
)
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


# ---------------------------------------------------- decode steps' weight copies


def decode_logits(model: GPT, idx: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of a prefill and then one-token decode steps through a KVCache."""
    cache = KVCache(model.config.n_layer, idx.size(1))
    with torch.no_grad():
        parts = [model(idx[:, :prefill], kv_cache=cache)]
        for t in range(prefill, idx.size(1)):
            parts.append(model(idx[:, t : t + 1], kv_cache=cache))
    return torch.cat(parts, 1)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def copied(layer: torch.nn.Module) -> bool:
    return vars(layer).get("_decode_copy", (0, None))[1] is not None


def test_decode_steps_use_transposed_copies_of_the_short_row_weights():
    model = make("learned")
    idx = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(idx)
    close(decode_logits(model, idx, 5), full)
    block = model.transformer.h[0]
    # in <= out: read as (in, out) copies; mlp.c_proj (128 -> 32) stays (out, in)
    assert copied(block.attn.c_attn) and copied(block.attn.c_proj)
    assert copied(block.mlp.c_fc) and copied(model.lm_head)
    assert not copied(block.mlp.c_proj)
    w_t = vars(block.mlp.c_fc)["_decode_copy"][1]
    assert w_t.shape == (32, 128) and w_t.is_contiguous()
    assert torch.equal(w_t, block.mlp.c_fc.weight.t())
    held = decode_copy_bytes(model)
    linears = [block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc]
    per_block = sum(m.weight.nbytes for m in linears)
    assert held == 2 * per_block + model.lm_head.weight.nbytes


def test_apply_linear_equals_the_layer_and_only_copies_small_no_grad_calls():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 48)
    for rows in (1, 2, 3):
        x = torch.randn(rows, 1, 16)
        with torch.no_grad():
            torch.testing.assert_close(apply_linear(layer, x), layer(x))
        assert copied(layer) == (rows <= DECODE_ROWS)
        set_decode_copies(layer)  # drops the copy
    x = torch.randn(1, 16)
    apply_linear(layer, x).sum().backward()  # gradients on: the parameter itself
    assert layer.weight.grad is not None and not copied(layer)
    narrowing = torch.nn.Linear(48, 16)  # long rows: (out, in) is the faster one
    with torch.no_grad():
        apply_linear(narrowing, torch.randn(1, 48))
    assert not copied(narrowing)


def test_decode_copies_follow_weight_updates_and_can_be_turned_off():
    model = make("rope", norm="rmsnorm", ffn="swiglu")
    idx = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(4))
    decode_logits(model, idx, 6)  # makes the copies
    # one SGD step changes every weight in place: the copies must be remade
    model.train()
    loss = model(idx, targets=idx)[1]
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    model.eval()
    with torch.no_grad():
        full = model(idx)
    close(decode_logits(model, idx, 6), full)
    # so must load_state_dict (copy_ into the same tensors)
    other = make("rope", norm="rmsnorm", ffn="swiglu")
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-1.5)
        model.load_state_dict(other.state_dict())
        full = other(idx)
    close(decode_logits(model, idx, 6), full)
    # a write through .data is invisible to the version counter: reset by hand
    for p in model.parameters():
        p.data.mul_(0.5)
    set_decode_copies(model)
    with torch.no_grad():
        full = model(idx)
    close(decode_logits(model, idx, 6), full)
    set_decode_copies(model, False)
    assert decode_copy_bytes(model) == 0
    close(decode_logits(model, idx, 6), full)
    assert decode_copy_bytes(model) == 0  # off stays off
    set_decode_copies(model, True)  # back on: made at the next decode step
    decode_logits(model, idx, 6)
    assert decode_copy_bytes(model) > 0


def test_a_model_built_in_inference_mode_decodes_without_copies():
    with torch.inference_mode():  # its weights have no version counter
        model = make("learned")
    out = generate(model, torch.tensor([[1, 2]]), 4, temperature=0)
    assert out.shape == (1, 6) and not any(copied(m) for m in model.modules())


def test_forward_hooks_on_a_linear_layer_run_in_decode_steps_too():
    # head ablation (shared.evaluation.heads) is a pre-hook on attn.c_proj
    model = make("learned")
    c_proj = model.transformer.h[1].attn.c_proj
    seen = []
    handle = c_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    ids = generate(model, torch.tensor([[1, 2, 3]]), 5, temperature=0)
    handle.remove()
    assert [x.size(1) for x in seen] == [3, 1, 1, 1, 1]  # prefill, then 4 steps
    assert not copied(c_proj)
    assert torch.equal(generate(model, torch.tensor([[1, 2, 3]]), 5, 0), ids)
    assert copied(c_proj)  # no hook: the copy again


def test_torchao_quantized_weights_get_no_copy():
    # torchao keeps nn.Linear but makes its weight an Int8Tensor (a tensor subclass
    # that reports float32): it computes its own way, and a transpose copy would not
    pytest.importorskip("torchao")
    from shared.quantize import torchao_int8

    quantized = torchao_int8(make("learned"))
    idx = torch.tensor([[1, 2, 3]])
    cached = generate(quantized, idx, 6, temperature=0)
    assert decode_copy_bytes(quantized) == 0
    assert torch.equal(cached, generate(quantized, idx, 6, 0, use_cache=False))
