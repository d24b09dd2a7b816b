"""Export of the course's Llama-style GPT (RMSNorm, SwiGLU, RoPE, no biases, any
number of key/value heads): Hugging Face's ``LlamaForCausalLM`` gives our logits
and our greedy tokens, and its tokenizer our ids."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import (
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from shared.attention import apply_rope, rope_cache
from shared.chat import END, encode_chat, with_chat_tokens
from shared.data import read_text
from shared.export import main
from shared.generation import generate
from shared.hf_export import export_hf
from shared.llama_export import (
    check_llama_exportable,
    llama_config,
    llama_state_dict,
)
from shared.model import GPT, GPTConfig
from shared.pretrained import save_course_model
from shared.tokenizer import ENDOFTEXT, BPETokenizer

VOCAB = 320  # more ids than the tokenizer's 300 (a padded vocabulary), as in chapter 4
LLAMA = dict(norm="rmsnorm", ffn="swiglu", pos_encoding="rope", bias=False)
CONFIGS = {
    "mha": dict(n_kv_head=4, tie_weights=False),
    "gqa-2kv": dict(n_kv_head=2, tie_weights=False, rope_base=500.0),
    "mqa-1kv": dict(n_kv_head=1, tie_weights=False, ffn_hidden=40),
    "gqa-tied": dict(n_kv_head=2, tie_weights=True),
}
FILES = {"config.json", "generation_config.json", "model.safetensors", "vocab.json"}
FILES |= {"merges.txt", "tokenizer.json", "tokenizer_config.json"}
FILES |= {"special_tokens_map.json"}


def tiny_llama(seed: int = 0, **overrides) -> GPT:
    """A seeded tiny Llama-style GPT. Its norm gains are moved off 1 so they matter,
    and its blocks' matrices are 8x larger so that the blocks, not the embedding,
    pick the next token (a random tied model would repeat its last token)."""
    torch.manual_seed(seed)
    base = dict(vocab_size=VOCAB, context_length=64, n_layer=2, n_head=4, n_embd=32)
    model = GPT(GPTConfig(**(base | LLAMA | overrides))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or "ln_f" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.startswith("transformer.h."):
                p.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    text = read_text("tinyshakespeare")[:5000]
    return BPETokenizer().train(text, 300, special_tokens=[ENDOFTEXT])


@pytest.fixture(scope="module", params=list(CONFIGS))
def exported(request, tokenizer, tmp_path_factory):
    """(our model, the exported folder, LlamaForCausalLM loaded from it)."""
    model = tiny_llama(**CONFIGS[request.param])
    folder = export_hf(model, tokenizer, tmp_path_factory.mktemp(request.param))
    hf, info = LlamaForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    return model, folder, hf.eval()


def ids(batch: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(
        0, VOCAB, (batch, t), generator=torch.Generator().manual_seed(seed)
    )


# ---------------------------------------------------------------------------- model


def test_logits_equal_ours(exported):
    model, _, hf = exported
    idx = ids(3, 40)
    with torch.no_grad():
        theirs, ours = hf(idx).logits, model(idx)
    assert (theirs - ours).abs().max() < 1e-4


def test_greedy_generation_equals_ours(exported):
    model, _, hf = exported
    prompt = ids(1, 6, seed=2)
    ours = generate(model, prompt, 30, temperature=0)
    # no eos: both make 30 tokens, also where <|endoftext|> is the argmax (a
    # GenerationConfig(eos_token_id=None) would not do: the folder's eos comes back)
    with torch.no_grad():
        theirs = hf.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30,
            do_sample=False, eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    assert theirs.shape == (1, 36)
    assert theirs.tolist() == ours.tolist()


def test_config_holds_llamas_fields(exported, tokenizer):
    model, folder, hf = exported
    cfg = model.config
    config = json.loads((folder / "config.json").read_text())
    assert {p.name for p in folder.iterdir()} == FILES
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama" and config["hidden_act"] == "silu"
    expected = dict(
        hidden_size=cfg.n_embd, intermediate_size=cfg.hidden_size,
        num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        num_hidden_layers=cfg.n_layer, max_position_embeddings=cfg.context_length,
        vocab_size=VOCAB, rms_norm_eps=1e-5, rope_theta=cfg.rope_base,
        tie_word_embeddings=cfg.tie_weights, attention_bias=False, mlp_bias=False,
        bos_token_id=tokenizer.special_tokens[ENDOFTEXT],
        eos_token_id=tokenizer.special_tokens[ENDOFTEXT], dtype="float32",
    )  # fmt: skip
    assert {k: config[k] for k in expected} == expected
    assert config["rope_parameters"]["rope_theta"] == cfg.rope_base
    assert hf.config.rope_parameters["rope_theta"] == cfg.rope_base
    keys = set(llama_state_dict(model))
    assert ("lm_head.weight" in keys) != cfg.tie_weights  # a tied head: written once
    if cfg.tie_weights:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()


def test_our_rope_is_llamas_rotate_half():
    # the reason q_proj and k_proj rows need no permutation
    config = LlamaConfig(
        hidden_size=64, num_attention_heads=4, rope_parameters={"rope_theta": 500.0}
    )
    q, k = torch.randn(2, 2, 4, 10, 16).unbind(0)  # (B, heads, T, head_dim)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [3, 4, 5, 6, 7] * 2])
    cos, sin = LlamaRotaryEmbedding(config)(q, positions)
    theirs = apply_rotary_pos_emb(q, k, cos, sin)
    cos, sin = rope_cache(16, 32, base=500.0)
    ours = [apply_rope(x, cos, sin, positions) for x in (q, k)]
    torch.testing.assert_close(ours[0], theirs[0])
    torch.testing.assert_close(ours[1], theirs[1])


def rotate_pairs(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder each head's rows from halves (i, i + d/2) to neighbours (2i, 2i + 1):
    the layout of Meta's checkpoints, wrong for Hugging Face's rotate_half."""
    heads = w.view(-1, 2, head_dim // 2, w.size(-1))
    return heads.transpose(1, 2).reshape(w.shape)


def break_kv(sd: dict, layer: str) -> None:
    sd[layer + "k_proj.weight"], sd[layer + "v_proj.weight"] = (
        sd[layer + "v_proj.weight"], sd[layer + "k_proj.weight"],
    )  # fmt: skip


def break_rope(sd: dict, layer: str) -> None:
    for name in ("q_proj.weight", "k_proj.weight"):
        sd[layer + name] = rotate_pairs(sd[layer + name], 8)


def break_gqa_groups(sd: dict, layer: str) -> None:
    # the two key heads in the other order: query heads read the wrong group
    sd[layer + "k_proj.weight"] = (
        sd[layer + "k_proj.weight"].view(2, 8, -1).flip(0).reshape(16, -1)
    )


def break_gate_up(sd: dict, layer: str) -> None:
    mlp = layer.replace("self_attn.", "mlp.")
    sd[mlp + "gate_proj.weight"], sd[mlp + "up_proj.weight"] = (
        sd[mlp + "up_proj.weight"], sd[mlp + "gate_proj.weight"],
    )  # fmt: skip


@pytest.mark.parametrize(
    "corrupt", [break_kv, break_rope, break_gqa_groups, break_gate_up]
)
def test_a_wrong_conversion_changes_the_logits(tokenizer, corrupt):
    # the logits test above would catch each of these mistakes
    model = tiny_llama(**CONFIGS["gqa-2kv"])
    sd = llama_state_dict(model)
    for i in range(model.config.n_layer):
        corrupt(sd, f"model.layers.{i}.self_attn.")
    hf = LlamaForCausalLM(llama_config(model, tokenizer)).eval()
    hf.load_state_dict(sd, strict=True)
    idx = ids(2, 40)
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)).abs().max() > 1e-2


# ---------------------------------------------------------------------------- tokenizer


def test_tokenizer_loads_and_encodes_like_ours(exported, tokenizer):
    _, folder, _ = exported
    hf = AutoTokenizer.from_pretrained(folder)
    text = read_text("tinyshakespeare")[10_000:13_000] + " naïve café 🤗\n\n"
    assert hf(text)["input_ids"] == tokenizer.encode(text)  # no BOS prepended
    assert hf.decode(tokenizer.encode(text)) == text
    assert hf.eos_token_id == tokenizer.special_tokens[ENDOFTEXT]


def test_chat_tokenizer_brings_its_template_and_stops_at_end(tmp_path, tokenizer):
    chat = with_chat_tokens(tokenizer)
    export_hf(tiny_llama(), chat, tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "Speak."}]
    ours, _ = encode_chat(chat, messages, add_generation_prompt=True)
    out = hf.apply_chat_template(messages, add_generation_prompt=True)
    assert out["input_ids"] == ours
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["eos_token_id"] == hf.eos_token_id == chat.special_tokens[END]


# ---------------------------------------------------------------------------- refusals


def test_refuses_a_gpt2_style_model():
    gpt2 = GPT(GPTConfig(vocab_size=VOCAB, context_length=32, n_layer=1, n_head=2,
                         n_embd=16))  # fmt: skip
    with pytest.raises(ValueError, match="Llama cannot represent") as refused:
        llama_state_dict(gpt2)
    for why in ("norm='layernorm'", "ffn='gelu'", "pos_encoding='learned'", "bias"):
        assert why in str(refused.value)
    with pytest.raises(TypeError, match="shared.model.GPT"):
        check_llama_exportable(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "change, why",
    [
        (dict(bias=True), "bias=True"),
        (dict(pos_encoding="sinusoidal"), "pos_encoding='sinusoidal'"),
        (dict(norm="layernorm"), "norm='layernorm'"),
        (dict(ffn="gelu"), "ffn='gelu'"),
    ],
)
def test_refuses_a_half_modern_model(tokenizer, tmp_path, change, why):
    model = tiny_llama(**change)
    with pytest.raises(ValueError, match=f"Llama cannot represent.*{why}"):
        check_llama_exportable(model)
    # neither GPT-2 nor Llama: export_hf refuses it, naming both, writing nothing
    with pytest.raises(ValueError, match="GPT-2 cannot represent.*export to Llama"):
        export_hf(model, tokenizer, tmp_path)
    assert not any(tmp_path.iterdir())


def test_gpt2_style_still_exports_gpt2(tokenizer, tmp_path):
    gpt2 = GPT(GPTConfig(vocab_size=VOCAB, context_length=32, n_layer=1, n_head=2,
                         n_embd=16))  # fmt: skip
    export_hf(gpt2, tokenizer, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"]


# ---------------------------------------------------------------------------- CLI


def test_command_line_exports_a_saved_llama_style_model(tokenizer, tmp_path, capsys):
    # a course model folder: the model's vocabulary is the tokenizer's
    model = tiny_llama(seed=3, n_kv_head=2, tie_weights=False, vocab_size=300)
    folder = save_course_model(model, tokenizer, tmp_path / "tiny-llama", {"name": "t"})
    out = main(["hf", str(tmp_path / "hf"), "--model", str(folder)])
    printed = capsys.readouterr().out
    assert "as a Hugging Face Llama folder (LlamaForCausalLM" in printed
    assert "LlamaForCausalLM.from_pretrained" in printed
    hf = LlamaForCausalLM.from_pretrained(out).eval()
    assert hf.config.num_key_value_heads == 2
    info = json.loads((out / "course_info.json").read_text())
    assert info["model_config"]["n_kv_head"] == 2  # the course's own record travels
    idx = ids(1, 20) % 300
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)).abs().max() < 1e-4


def test_command_line_help_names_both_architectures(capsys):
    with pytest.raises(SystemExit):
        main(["hf", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "GPT2LMHeadModel" in text and "LlamaForCausalLM" in text
