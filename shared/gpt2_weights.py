"""Published GPT-2 weights in the course's GPT: Hugging Face's ``GPT2LMHeadModel``
state dict (or the hub's safetensors) translated key by key, its config inferred from
the weight shapes, and ``from_gpt2`` to build a loaded model in one call."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from shared.model import GPT, GPTConfig

# HF's GPT-2 uses Conv1D layers that store weights as (in, out): transpose these
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight")
CONV1D_WEIGHTS += ("mlp.c_proj.weight",)
# buffers (causal mask) that some transformers versions keep in the state dict
_IGNORED = re.compile(r".*\.attn\.(bias|masked_bias)$")


def _strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as in GPT2LMHeadModel ('transformer.h.0...', optional 'lm_head.weight')."""
    out = {}
    for key, value in state_dict.items():
        if _IGNORED.match(key):
            continue
        if key.startswith(("transformer.", "lm_head.")):
            out[key] = value
        else:  # GPT2Model / hub safetensors keys lack the prefix: 'h.0.attn...'
            out["transformer." + key] = value
    return out


def gpt2_config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> GPTConfig:
    """Infer a GPT-2 config from weight shapes (n_head assumes GPT-2's head size 64)."""
    sd = _strip_prefix(state_dict)
    vocab_size, n_embd = sd["transformer.wte.weight"].shape
    layers = {int(k.split(".")[2]) for k in sd if k.startswith("transformer.h.")}
    return GPTConfig(
        vocab_size=vocab_size,
        context_length=sd["transformer.wpe.weight"].shape[0],
        n_layer=len(layers),
        n_head=max(1, n_embd // 64),
        n_embd=n_embd,
    )


@torch.no_grad()
def load_gpt2_weights(model: GPT, state_dict: Mapping[str, torch.Tensor]) -> GPT:
    """Copy a Hugging Face GPT-2 state dict into ``model`` (in place; returned too)."""
    cfg = model.config
    if (cfg.pos_encoding, cfg.norm, cfg.ffn, cfg.bias) != (
        "learned",
        "layernorm",
        "gelu",
        True,
    ):
        raise ValueError(
            "GPT-2 weights need pos_encoding='learned', norm='layernorm', ffn='gelu', "
            f"bias=True; got {cfg.pos_encoding!r}, {cfg.norm!r}, {cfg.ffn!r}, "
            f"bias={cfg.bias}"
        )
    source = _strip_prefix(state_dict)
    target = model.state_dict()
    head = source.pop("lm_head.weight", None)
    if cfg.tie_weights:
        target.pop("lm_head.weight", None)
        wte = source.get("transformer.wte.weight")
        if head is not None and wte is not None and not torch.equal(head, wte):
            raise ValueError(
                "lm_head.weight differs from wte.weight: use tie_weights=False"
            )
    elif head is not None:
        source["lm_head.weight"] = head
    elif "transformer.wte.weight" in source:  # untied model, tied checkpoint
        source["lm_head.weight"] = source["transformer.wte.weight"]

    missing = sorted(set(target) - set(source))
    unexpected = sorted(set(source) - set(target))
    if missing or unexpected:
        raise ValueError(
            f"state dict does not fit this GPT: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}"
        )
    for key, value in source.items():
        if key.endswith(CONV1D_WEIGHTS):
            value = value.t()
        if value.shape != target[key].shape:
            raise ValueError(
                f"shape mismatch for {key}: checkpoint {tuple(value.shape)}, model "
                f"{tuple(target[key].shape)} — is the config the checkpoint's config?"
            )
        target[key].copy_(value)
    return model


def from_gpt2(
    state_dict: Mapping[str, torch.Tensor], config: GPTConfig | None = None
) -> GPT:
    """A GPT with GPT-2's weights; ``config`` defaults to the one the shapes imply."""
    model = GPT(config or gpt2_config_from_state_dict(state_dict))
    return load_gpt2_weights(model, state_dict)
