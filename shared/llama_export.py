"""A Llama-style course GPT as Hugging Face's ``LlamaForCausalLM``: config and weights.

The course's modern block (``GPTConfig(norm="rmsnorm", ffn="swiglu",
pos_encoding="rope", bias=False)``, any ``n_kv_head``) is the block of Llama
(Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models",
arXiv:2302.13971): pre-norm RMSNorm (Zhang & Sennrich 2019), a SwiGLU feed-forward
(Shazeer 2020, "GLU Variants Improve Transformer"), rotary position embeddings (Su et
al. 2021, "RoFormer", arXiv:2104.09864) and, from Llama 2 on, grouped-query attention
(Ainslie et al. 2023, "GQA", arXiv:2305.13245; one key/value head is multi-query
attention, Shazeer 2019). Only the names and the packing of the weights differ::

    course GPT                          LlamaForCausalLM
    transformer.wte                     model.embed_tokens
    transformer.h.N.ln_1                model.layers.N.input_layernorm
    transformer.h.N.attn.c_attn  rows   [q | k | v] -> self_attn.{q,k,v}_proj
    transformer.h.N.attn.c_proj         model.layers.N.self_attn.o_proj
    transformer.h.N.ln_2                model.layers.N.post_attention_layernorm
    transformer.h.N.mlp.c_fc     rows   [gate | up] -> mlp.{gate,up}_proj
    transformer.h.N.mlp.c_proj          model.layers.N.mlp.down_proj
    transformer.ln_f                    model.norm
    lm_head                             lm_head (left out when tied)

Both store a ``Linear`` as (out, in), so nothing is transposed (GPT-2's ``Conv1D`` is
(in, out)). Key/value head ``j`` serves query heads ``j * g .. j * g + g - 1`` in
both (``shared.attention.repeat_kv`` and Llama's ``repeat_kv``), so the rows of
``k`` and ``v`` keep their order.

RoPE needs no permutation either. Meta's original Llama code rotates neighbouring
pairs ``(x0, x1), (x2, x3), ...`` of each head; Hugging Face's rotates the two halves,
``(x_i, x_{i + d/2})`` (``rotate_half``), and its conversion script reorders the rows
of ``q_proj`` and ``k_proj`` to match. ``shared.attention.apply_rope`` rotates the
halves with the same frequencies, ``base ** (-2i / d)``, so the rows copy as they
are. (A model that rotated pairs would need that permutation, or its logits would
differ: ``tests/test_llama_export.py`` shows they do.)

A tied output head is fine: Llama has ``tie_word_embeddings`` (Llama 3.2 1B and 3B
use it). Configurations Llama cannot hold are refused, naming what differs: biases,
learned or sinusoidal positions, LayerNorm, the GELU MLP.

``shared.hf_export.export_hf`` (and ``python -m shared.export hf``) writes a
Llama-style model with this module's config and weights and the same tokenizer files
as a GPT-2 export: the course's byte-level BPE, no BOS token prepended (the course
trains without one), the chat template for a chat tokenizer.
"""

from __future__ import annotations

import torch

from shared.chat import END
from shared.lora import lora_layers
from shared.model import GPT
from shared.tokenizer import ENDOFTEXT, BPETokenizer

# the GPTConfig fields that make a block Llama's
LLAMA_STYLE = dict(norm="rmsnorm", ffn="swiglu", pos_encoding="rope", bias=False)
WHY = dict(
    norm="Llama normalises with RMSNorm",
    ffn="Llama's feed-forward is SwiGLU",
    pos_encoding="Llama rotates queries and keys (RoPE)",
    bias="Llama's Linear layers and norms have no biases",
)


def is_llama_style(config) -> bool:
    """Does this ``GPTConfig`` have Llama's block (RMSNorm, SwiGLU, RoPE, no bias)?"""
    return all(getattr(config, k) == v for k, v in LLAMA_STYLE.items())


def check_llama_exportable(model: GPT) -> None:
    """Raise ValueError unless Hugging Face's ``LlamaForCausalLM`` can hold ``model``
    exactly (TypeError if it is not a course GPT)."""
    if not isinstance(model, GPT):
        raise TypeError(f"expected a shared.model.GPT, got {type(model).__name__}")
    cfg = model.config
    problems = [
        f"{k}={getattr(cfg, k)!r} ({WHY[k]})"
        for k, v in LLAMA_STYLE.items()
        if getattr(cfg, k) != v
    ]
    if lora_layers(model):
        problems.append("unmerged LoRA layers (merge them: shared.lora.merge_lora)")
    if problems:
        raise ValueError(
            "Hugging Face's Llama cannot represent this model: "
            + "; ".join(problems)
            + ". Llama-style models are GPTConfig(norm='rmsnorm', ffn='swiglu', "
            "pos_encoding='rope', bias=False), any n_kv_head, tied or untied."
        )


def llama_config(model: GPT, tokenizer: BPETokenizer):
    """The ``transformers.LlamaConfig`` of ``model``: its shapes, RoPE base, norm eps,
    tying; bos = ``<|endoftext|>``, eos the same or ``<|end|>`` for a chat tokenizer."""
    from transformers import LlamaConfig

    check_llama_exportable(model)
    cfg = model.config
    eot = tokenizer.special_tokens.get(ENDOFTEXT)
    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.hidden_size,  # SwiGLU's width (gate and up each)
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.n_embd // cfg.n_head,
        hidden_act="silu",
        max_position_embeddings=cfg.context_length,
        rms_norm_eps=model.transformer.ln_f.eps,
        rope_parameters=dict(rope_type="default", rope_theta=float(cfg.rope_base)),
        attention_bias=False,
        mlp_bias=False,
        # dropout on the attention weights, as ours; Llama has no residual dropout
        attention_dropout=cfg.dropout,
        tie_word_embeddings=cfg.tie_weights,
        bos_token_id=eot,
        eos_token_id=tokenizer.special_tokens.get(END, eot),
        architectures=["LlamaForCausalLM"],
        dtype=str(model.transformer.wte.weight.dtype).removeprefix("torch."),
    )
    # transformers 5 keeps the base in rope_parameters; older readers (transformers
    # 4, llama.cpp's converter) look for rope_theta at the top level
    config.rope_theta = float(cfg.rope_base)
    return config


def llama_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The weights under ``LlamaForCausalLM``'s names (fused ``c_attn`` and ``c_fc``
    split into their parts); a tied head is left out, Hugging Face ties it on
    loading."""
    check_llama_exportable(model)
    cfg = model.config
    kv_dim = cfg.n_kv_head * (cfg.n_embd // cfg.n_head)
    out = {"model.embed_tokens.weight": model.transformer.wte.weight}
    for i, block in enumerate(model.transformer.h):
        layer = f"model.layers.{i}."
        q, k, v = block.attn.c_attn.weight.split([cfg.n_embd, kv_dim, kv_dim])
        gate, up = block.mlp.c_fc.weight.chunk(2)  # SwiGLU.forward's order
        out |= {
            layer + "input_layernorm.weight": block.ln_1.weight,
            layer + "self_attn.q_proj.weight": q,
            layer + "self_attn.k_proj.weight": k,
            layer + "self_attn.v_proj.weight": v,
            layer + "self_attn.o_proj.weight": block.attn.c_proj.weight,
            layer + "post_attention_layernorm.weight": block.ln_2.weight,
            layer + "mlp.gate_proj.weight": gate,
            layer + "mlp.up_proj.weight": up,
            layer + "mlp.down_proj.weight": block.mlp.c_proj.weight,
        }
    out["model.norm.weight"] = model.transformer.ln_f.weight
    if not cfg.tie_weights:
        out["lm_head.weight"] = model.lm_head.weight
    return {name: w.detach().cpu().contiguous() for name, w in out.items()}
