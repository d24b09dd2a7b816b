"""Multi-head causal self-attention: an explicit-math path and a fused PyTorch path.

The explicit path spells out softmax(q k^T / sqrt(d) + causal mask) v so a reader can
see (and plot) every attention weight; the fused path calls
``torch.nn.functional.scaled_dot_product_attention``, which computes the same numbers
without materialising the (T, T) matrix. Rotary position embeddings (RoPE) live here
too, because they act on the queries and keys inside attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IMPLS = ("explicit", "fused")


def causal_mask(t_q: int, t_k: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean (t_q, t_k) mask, True where a query may NOT look (the future).

    Queries are the last ``t_q`` positions of the ``t_k`` keys, so the same mask also
    works when new queries attend to cached keys (``t_q < t_k``).
    """
    ones = torch.ones(t_q, t_k, dtype=torch.bool, device=device)
    return torch.triu(ones, diagonal=1 + t_k - t_q)


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    impl: str = "fused",
    dropout_p: float = 0.0,
    return_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal scaled dot-product attention on (..., T, d) tensors.

    ``impl="explicit"`` computes the weights by hand; ``"fused"`` uses PyTorch's kernel.
    ``dropout_p`` is applied as given (pass 0.0 in eval mode). With ``return_weights``
    (explicit only) also return the softmax weights (..., T_q, T_k), before dropout.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    t_q, t_k = q.size(-2), k.size(-2)
    if impl == "fused" and not return_weights:
        if t_q == t_k:
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout_p, is_causal=True
            )
        # SDPA's is_causal aligns the mask top-left; new queries over cached keys need
        # bottom-right alignment, so pass the mask explicitly (True = may attend).
        allowed = ~causal_mask(t_q, t_k, q.device)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=dropout_p
        )
    if impl == "fused":
        raise ValueError(
            "return_weights needs impl='explicit' (the fused kernel hides them)"
        )

    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (..., T_q, T_k)
    # mask BEFORE softmax: -inf becomes exactly 0 weight and the rows still sum to 1
    scores = scores.masked_fill(causal_mask(t_q, t_k, q.device), float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    out = dropped @ v
    return (out, weights) if return_weights else out


# ---------------------------------------------------------------------------- RoPE


def rope_cache(
    head_dim: int, context_length: int, base: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines (context_length, head_dim) for rotary position embeddings."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(context_length).float(), inv_freq)  # (T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hd): pairs (i, i + hd/2)
    return angles.cos(), angles.sin()


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int = 0
) -> torch.Tensor:
    """Rotate (..., T, head_dim) queries or keys by their positions (rotate-half)."""
    t = x.size(-2)
    cos, sin = (
        cos[offset : offset + t].to(x.dtype),
        sin[offset : offset + t].to(x.dtype),
    )
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


# ---------------------------------------------------------------------------- module


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention, one fused q, k, v projection (GPT-2 layout)."""

    def __init__(
        self,
        d_in: int,
        n_head: int,
        context_length: int,
        dropout: float = 0.0,
        bias: bool = True,
        rope: bool = False,
        impl: str = "fused",
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__()
        if d_in % n_head:
            raise ValueError(f"n_embd={d_in} must be divisible by n_head={n_head}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.n_head, self.n_embd, self.head_dim = n_head, d_in, d_in // n_head
        self.context_length, self.dropout, self.impl = context_length, dropout, impl
        self.c_attn = nn.Linear(d_in, 3 * d_in, bias=bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(d_in, d_in, bias=bias)  # mixes the heads back together
        self.resid_dropout = nn.Dropout(dropout)
        self.rope = rope
        if rope:
            cos, sin = rope_cache(self.head_dim, context_length, rope_base)
            # not persistent: derived from the config, so not part of the state dict
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    @classmethod
    def from_config(cls, config) -> MultiHeadAttention:
        """Build from a ``GPTConfig`` (or anything with the same fields)."""
        return cls(**_config_kwargs(config))

    def forward(
        self, x: torch.Tensor, return_weights: bool = False, impl: str | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, T, C) -> (B, T, C); with ``return_weights`` also (B, n_head, T, T)."""
        b, t, c = x.shape
        if t > self.context_length:
            raise ValueError(
                f"sequence of {t} tokens is longer than context_length="
                f"{self.context_length}"
            )
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim): each head attends independently
        q, k, v = (
            z.view(b, t, self.n_head, self.head_dim).transpose(1, 2) for z in (q, k, v)
        )
        if self.rope:
            q = apply_rope(q, self.rope_cos, self.rope_sin)
            k = apply_rope(k, self.rope_cos, self.rope_sin)
        impl = "explicit" if return_weights else (impl or self.impl)
        p = self.dropout if self.training else 0.0
        result = causal_attention(
            q, k, v, impl=impl, dropout_p=p, return_weights=return_weights
        )
        out, weights = result if return_weights else (result, None)
        out = out.transpose(1, 2).contiguous().view(b, t, c)  # concatenate the heads
        out = self.resid_dropout(self.c_proj(out))
        return (out, weights) if return_weights else out


class CausalSelfAttention(MultiHeadAttention):
    """nanoGPT's name for the same module, built from a ``GPTConfig``."""

    def __init__(self, config) -> None:
        super().__init__(**_config_kwargs(config))

    @classmethod
    def from_config(cls, config) -> CausalSelfAttention:
        """Same as ``CausalSelfAttention(config)``."""
        return cls(config)


def _config_kwargs(config) -> dict:
    return dict(
        d_in=config.n_embd,
        n_head=config.n_head,
        context_length=config.context_length,
        dropout=config.dropout,
        bias=config.bias,
        rope=getattr(config, "pos_encoding", "learned") == "rope",
        impl=getattr(config, "attn_impl", "fused"),
    )
