"""GPT model: logits equal to Hugging Face GPT-2, clear errors, counting helpers."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from shared.attention import position_ids_from_mask
from shared.flops import flops_per_token, parameter_counts, weight_memory_bytes
from shared.gpt2_weights import (
    from_gpt2,
    gpt2_config_from_state_dict,
    load_gpt2_weights,
)
from shared.model import GPT, GPTConfig, RMSNorm, evaluating, sinusoidal_table

VOCAB, CTX, LAYERS, HEADS, EMBD = 101, 32, 3, 4, 48


def small_config(**kw) -> GPTConfig:
    return GPTConfig(VOCAB, CTX, LAYERS, HEADS, EMBD, **kw)


@pytest.fixture(scope="module")
def hf_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=CTX,
        n_embd=EMBD,
        n_layer=LAYERS,
        n_head=HEADS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(cfg).eval()
    # HF initialises biases and LayerNorms to 0/1: randomise them so the test sees them
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("attn_impl", ["fused", "explicit"])
def test_logits_match_huggingface_gpt2(hf_model, attn_impl):
    model = from_gpt2(hf_model.state_dict(), small_config(attn_impl=attn_impl))
    model.eval()
    idx = torch.randint(0, VOCAB, (4, CTX), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx), hf_model(idx).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    with torch.no_grad():  # and on a prefix shorter than the context
        short = model(idx[:, :7]) - hf_model(idx[:, :7]).logits
    assert short.abs().max().item() < 1e-4


def test_loss_matches_huggingface(hf_model):
    model = from_gpt2(hf_model.state_dict(), small_config()).eval()
    idx = torch.randint(0, VOCAB, (2, CTX), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, loss = model(idx[:, :-1], idx[:, 1:])
        hf_loss = hf_model(idx, labels=idx).loss  # HF shifts labels itself
    torch.testing.assert_close(loss, hf_loss, atol=1e-5, rtol=1e-5)


def test_loader_accepts_unprefixed_keys_and_mask_buffers(hf_model):
    # the hub's model.safetensors has 'h.0.attn...' keys, no lm_head; old versions
    # also stored the causal-mask buffers 'attn.bias' / 'attn.masked_bias'
    sd = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items()}
    del sd["lm_head.weight"]
    sd["h.0.attn.bias"] = torch.ones(1, 1, CTX, CTX)
    sd["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    model = from_gpt2(sd, small_config()).eval()
    idx = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf_model(idx).logits, atol=1e-4, rtol=0)


def test_untied_model_gets_the_shared_head(hf_model):
    model = from_gpt2(hf_model.state_dict(), small_config(tie_weights=False))
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    torch.testing.assert_close(model.lm_head.weight, model.transformer.wte.weight)


def test_config_inferred_from_state_dict():
    hf = GPT2LMHeadModel(
        GPT2Config(vocab_size=53, n_positions=16, n_embd=128, n_layer=2, n_head=2)
    )
    cfg = gpt2_config_from_state_dict(hf.state_dict())
    assert (cfg.vocab_size, cfg.context_length, cfg.n_layer) == (53, 16, 2)
    assert (cfg.n_embd, cfg.n_head) == (128, 2)  # GPT-2's head size is 64


def test_shape_mismatch_is_a_clear_error(hf_model):
    wrong = GPT(GPTConfig(VOCAB + 1, CTX, LAYERS, HEADS, EMBD))
    with pytest.raises(ValueError, match="shape mismatch for transformer.wte.weight"):
        load_gpt2_weights(wrong, hf_model.state_dict())
    deeper = GPT(GPTConfig(VOCAB, CTX, LAYERS + 1, HEADS, EMBD))
    with pytest.raises(ValueError, match="missing"):
        load_gpt2_weights(deeper, hf_model.state_dict())
    with pytest.raises(ValueError, match="rmsnorm"):
        load_gpt2_weights(GPT(small_config(norm="rmsnorm")), hf_model.state_dict())


def test_too_long_and_out_of_vocab_inputs_are_clear_errors():
    model = GPT(small_config())
    with pytest.raises(ValueError, match="longer than context_length=32"):
        model(torch.zeros(1, CTX + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 101\)"):
        model(torch.tensor([[1, 2, VOCAB]]))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 4))


def test_weight_tying_shares_one_tensor():
    tied = GPT(small_config())
    assert tied.lm_head.weight is tied.transformer.wte.weight
    untied = GPT(small_config(tie_weights=False))
    assert untied.num_parameters() - tied.num_parameters() == VOCAB * EMBD


def test_parameter_count_matches_huggingface(hf_model):
    model = GPT(small_config())
    assert model.num_parameters() == hf_model.num_parameters()
    non_emb = model.num_parameters(exclude_embeddings=True)
    assert non_emb == model.num_parameters() - (VOCAB + CTX) * EMBD
    assert parameter_counts(small_config())["total"] == model.num_parameters()


def test_gpt2_presets_have_the_published_sizes():
    # counts of the published checkpoints (tied head counted once)
    expected = {"124M": 124_439_808, "355M": 354_823_168}
    expected |= {"774M": 774_030_080, "1558M": 1_557_611_200}
    for size, n in expected.items():
        assert parameter_counts(GPTConfig.gpt2(size))["total"] == n
    assert GPTConfig.gpt2("gpt2-xl") == GPTConfig.gpt2("1558M")
    with pytest.raises(ValueError, match="unknown GPT-2 size"):
        GPTConfig.gpt2("7B")


def test_flops_and_memory():
    cfg = GPTConfig.gpt2("124M")
    f = flops_per_token(cfg)
    # N: everything but the position table (tied head = the V x d matmul)
    assert f["N"] == 124_439_808 - 1024 * 768
    assert f["attention"] == 12 * 12 * 1024 * 768
    assert f["total"] == 6 * f["N"] + f["attention"]
    assert weight_memory_bytes(10, "bf16") == 20
    assert weight_memory_bytes(10, "fp32") == 40


def test_gpt2_init_scales_residual_projections():
    cfg = GPTConfig(50, 16, 8, 4, 256)
    model = GPT(cfg)
    proj = model.transformer.h[0].attn.c_proj.weight
    fc = model.transformer.h[0].mlp.c_fc.weight
    assert abs(fc.std().item() - 0.02) < 0.002
    assert abs(proj.std().item() - 0.02 / math.sqrt(2 * 8)) < 0.001
    assert torch.all(model.transformer.h[0].mlp.c_fc.bias == 0)


@pytest.mark.parametrize(
    "kw",
    [
        dict(pos_encoding="rope"),
        dict(pos_encoding="sinusoidal"),
        dict(norm="rmsnorm", ffn="swiglu", bias=False),
        dict(pos_encoding="rope", norm="rmsnorm", ffn="swiglu", tie_weights=False),
        dict(attn_impl="explicit", dropout=0.1),
    ],
)
def test_variants_forward_backward(kw):
    torch.manual_seed(0)
    model = GPT(small_config(**kw))
    g = torch.Generator().manual_seed(1)
    idx, targets = torch.randint(0, VOCAB, (2, 2, 16), generator=g)
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 16, VOCAB)
    assert abs(loss.item() - math.log(VOCAB)) < 0.5  # near-uniform at init
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    # causality: changing the last token does not change earlier logits
    model.eval()
    idx2 = idx.clone()
    idx2[:, -1] = (idx2[:, -1] + 1) % VOCAB
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[:, :-1], model(idx2)[:, :-1])


def test_attention_maps_shape_and_agreement():
    model = GPT(small_config(pos_encoding="rope"))
    model.train()
    idx = torch.randint(0, VOCAB, (2, 10))
    maps = model.attention_maps(idx)
    assert maps.shape == (LAYERS, 2, HEADS, 10, 10)
    assert not maps.requires_grad and model.training  # mode restored
    torch.testing.assert_close(maps.sum(-1), torch.ones(LAYERS, 2, HEADS, 10))
    assert torch.all(maps.triu(diagonal=1) == 0)


def test_rmsnorm_matches_torch():
    x = torch.randn(3, 5, 16)
    ours, ref = RMSNorm(16), torch.nn.RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        ours.weight.uniform_()
        ref.weight.copy_(ours.weight)
    torch.testing.assert_close(ours(x), ref(x))


def test_sinusoidal_table_formula():
    table = sinusoidal_table(20, 8)
    pos, i = 7, 2  # PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...)
    angle = torch.tensor(pos / 10000 ** (2 * i / 8))
    torch.testing.assert_close(table[pos, 2 * i], torch.sin(angle))
    torch.testing.assert_close(table[pos, 2 * i + 1], torch.cos(angle))


def test_bad_config_values():
    with pytest.raises(ValueError, match="pos_encoding"):
        small_config(pos_encoding="alibi")
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(10, 8, 1, 3, 16)


# ------------------------------------------------- attention masks and position ids


def _left_padded(rows: list[torch.Tensor], pad_id: int = 0):
    """Left-pad token rows to one batch: ids, attention mask (1 = real token)."""
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r) :], mask[i, t - len(r) :] = r, 1
    return ids, mask


ROWS = [torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(n))
        for n in (9, 4, 6)]  # fmt: skip


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal", "rope"])
@pytest.mark.parametrize("attn_impl", ["fused", "explicit"])
def test_left_padded_batch_equals_each_row_alone(pos_encoding, attn_impl):
    torch.manual_seed(0)
    model = GPT(small_config(pos_encoding=pos_encoding, attn_impl=attn_impl)).eval()
    ids, mask = _left_padded(ROWS)
    with torch.no_grad():
        batch = model(
            ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
        )
        assert not batch.isnan().any()
        for i, row in enumerate(ROWS):
            alone = model(row[None])
            torch.testing.assert_close(
                batch[i, -len(row) :], alone[0], atol=1e-5, rtol=1e-5
            )


def test_left_padded_batch_matches_huggingface(hf_model):
    model = from_gpt2(hf_model.state_dict(), small_config()).eval()
    ids, mask = _left_padded(ROWS)
    pos = position_ids_from_mask(mask)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=pos)
        theirs = hf_model(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()  # HF's padding rows are not defined to be anything
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)


def test_boolean_mask_forms_agree():
    torch.manual_seed(0)
    model = GPT(small_config()).eval()
    ids, mask = _left_padded(ROWS)
    pos = position_ids_from_mask(mask)
    t = ids.size(1)
    square = mask.bool()[:, None, :].expand(-1, t, -1)  # (B, T, T)
    with torch.no_grad():
        a = model(ids, attention_mask=mask, position_ids=pos)
        b = model(ids, attention_mask=square, position_ids=pos)
        c = model(ids, attention_mask=square[:, None], position_ids=pos)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(ids, attention_mask=mask[None, None, None])


def test_position_ids_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_position_ids_shift_the_positions_and_are_checked():
    torch.manual_seed(0)
    model = GPT(small_config()).eval()
    idx = torch.randint(0, VOCAB, (1, 4))
    with torch.no_grad():
        default = model(idx)
        same = model(idx, position_ids=torch.arange(4))
        shifted = model(idx, position_ids=torch.arange(4) + 5)
    torch.testing.assert_close(default, same, rtol=0, atol=0)
    assert (default - shifted).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"position ids must be in \[0, 32\)"):
        model(idx, position_ids=torch.arange(4) + CTX - 2)


def test_input_checks_never_ask_an_accelerator_for_values():
    # on the meta device every value read (.item(), bool()) raises: a forward pass
    # that completes proves the checks stay on the device (no host sync per step)
    with torch.device("meta"):
        model = GPT(small_config())
        idx = torch.zeros(2, 8, dtype=torch.long)
        logits, loss = model(idx, idx, attention_mask=torch.ones(2, 8),
                             position_ids=torch.arange(8))  # fmt: skip
    assert logits.shape == (2, 8, VOCAB) and loss.shape == ()


# ---------------------------------------------------------------- config fields


def test_ffn_width_and_rope_base_are_configurable_defaults_unchanged():
    assert parameter_counts(GPTConfig.gpt2("124M"))["total"] == 124_439_808
    for ffn, default in (("gelu", 4 * EMBD), ("swiglu", 128)):
        assert small_config(ffn=ffn).hidden_size == default
        narrow = GPT(small_config(ffn=ffn, ffn_hidden=40))
        assert narrow.transformer.h[0].mlp.c_proj.in_features == 40
    torch.manual_seed(0)
    a = GPT(small_config(pos_encoding="rope")).eval()
    b = GPT(small_config(pos_encoding="rope", rope_base=100.0)).eval()
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        assert (a(idx) - b(idx)).abs().max() > 1e-4  # the base changes the rotation
    with pytest.raises(ValueError, match="ffn_hidden"):
        small_config(ffn_hidden=0)


# ------------------------------------------------------------ eval mode, restored


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


class FailingForward(nn.Module):
    """A model whose forward raises on its second call (an interrupted scoring)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner, self.config, self.calls = model, model.config, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 2:
            interrupt()
        return self.inner(*args, **kwargs)


def scorers() -> dict:
    """Every function that puts a model in eval mode while it scores or generates."""
    from shared import dpo, evaluation, loss, tasks
    from shared.evaluation.harness import _score_windows
    from shared.generation import generate
    from shared.tokenizer import course_tokenizer

    tok = course_tokenizer()
    ids = np.arange(600) % 50
    examples = tasks.load_examples("test")[:8]
    pairs = dpo.encode_pairs(tok, tasks.load_pairs("test")[:8])
    return {
        "evaluate_split": lambda m: loss.evaluate_split(m, ids, batch_size=1),
        "estimate_loss": lambda m: loss.estimate_loss(
            m, {"val": ids}, eval_iters=3, batch_size=1
        ),
        "score_tokens": lambda m: evaluation.score_tokens(m, ids, batch_size=1),
        "loglikelihood": lambda m: evaluation.loglikelihood(
            m, tok, [("ROMEO:\n", "But soft"), ("KING:\n", "Go")], batch_size=1
        ),
        "response_loss": lambda m: evaluation.response_loss(
            m, tok, examples, batch_size=2
        ),
        "reference_logprobs": lambda m: dpo.reference_logprobs(m, pairs, batch_size=2),
        "harness windows": lambda m: _score_windows(m, [([1], [2]), ([3], [4])], 1),
        "generate": lambda m: generate(m, torch.tensor([[1, 2]]), 3),
    }


@pytest.mark.parametrize("name", list(scorers()))
def test_an_interrupted_scoring_restores_training_mode(name):
    # before the fix, 8 places set eval() and restored the mode only on success:
    # a Ctrl-C during evaluation left dropout switched off for the rest of training
    cfg = GPTConfig(1024, 128, n_layer=2, n_head=2, n_embd=32, dropout=0.1)
    model = FailingForward(GPT(cfg))
    model.train()
    with pytest.raises(KeyboardInterrupt):
        scorers()[name](model)
    assert model.calls == 2, "the model was not called twice: nothing was tested"
    assert model.training and model.inner.training, f"{name} left eval mode on"


def test_interrupted_attention_maps_restore_training_mode():
    model = GPT(small_config(dropout=0.1))
    model.train()
    model.transformer.h[1].forward = interrupt
    with pytest.raises(KeyboardInterrupt):
        model.attention_maps(torch.tensor([[1, 2, 3]]))
    assert model.training


def test_evaluating_restores_the_previous_mode():
    model = GPT(small_config())
    model.eval()
    with evaluating(model):
        assert not model.training
    assert not model.training  # it was in eval mode before: it stays there
    model.train()
    with pytest.raises(RuntimeError), evaluating(model):
        raise RuntimeError
    assert model.training
