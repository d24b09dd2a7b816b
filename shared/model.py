"""The GPT model: config, norms, feed-forward, pre-norm transformer blocks, the GPT.

Reads top to bottom like nanoGPT's ``model.py``: ``GPTConfig`` -> norms -> feed-forward
-> ``Block`` -> ``GPT``. Parameter names follow GPT-2's (``transformer.h.0.attn.c_attn``
...), so Hugging Face's GPT-2 state dict loads with only a few transposes
(``shared.gpt2_weights``).

Every Linear layer runs through ``shared.attention.apply_linear``: ``layer(x)``,
except in a CPU decode step (one or two rows, no gradients), which reads an
(in, out) copy of the weight: GPT-2's own Conv1D layout, which the CPU's
matrix-vector kernel reads faster (chapter 9; the parameters keep their layout).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from shared.attention import (
    IMPLS,
    MultiHeadAttention,
    apply_linear,
    check_in_range,
    check_positions,
    expand_attention_mask,
)
from shared.cross_entropy import chunked_cross_entropy
from shared.recompute import checkpoint

POS_ENCODINGS = ("learned", "sinusoidal", "rope")
NORMS = ("layernorm", "rmsnorm")
FFNS = ("gelu", "swiglu")

# name -> (n_layer, n_head, n_embd) of the four published GPT-2 models
GPT2_SIZES = {
    "124M": (12, 12, 768),
    "355M": (24, 16, 1024),
    "774M": (36, 20, 1280),
    "1558M": (48, 25, 1600),
}
GPT2_ALIASES = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M"}
GPT2_ALIASES |= {"gpt2-xl": "1558M", "1.5B": "1558M"}


@dataclass
class GPTConfig:
    """Everything that fixes the shapes and the architecture of a ``GPT``."""

    vocab_size: int
    context_length: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and norms (GPT-2: True)
    pos_encoding: str = "learned"  # "learned" | "sinusoidal" | "rope"
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    ffn: str = "gelu"  # "gelu" | "swiglu"
    tie_weights: bool = True  # output head shares the token-embedding matrix
    attn_impl: str = "fused"  # "fused" | "explicit"
    ffn_hidden: int | None = (
        None  # feed-forward width; None: 4 n_embd (SwiGLU: 2/3 of it)
    )
    rope_base: float = 10000.0  # RoPE's longest wavelength, in positions (/ 2 pi)
    # key/value heads (chapter 9): None or n_head = multi-head attention, fewer =
    # grouped-query attention (each shared by n_head // n_kv_head query heads),
    # 1 = multi-query attention; the KV cache shrinks by n_head / n_kv_head
    n_kv_head: int | None = None

    def __post_init__(self) -> None:
        for name, value, allowed in [
            ("pos_encoding", self.pos_encoding, POS_ENCODINGS),
            ("norm", self.norm, NORMS),
            ("ffn", self.ffn, FFNS),
            ("attn_impl", self.attn_impl, IMPLS),
        ]:
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}"
            )
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(
                f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}"
            )
        if self.pos_encoding == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError("RoPE needs an even head dimension (n_embd // n_head)")
        if self.ffn_hidden is not None and self.ffn_hidden < 1:
            raise ValueError(f"ffn_hidden must be positive, got {self.ffn_hidden}")

    @property
    def hidden_size(self) -> int:
        """Feed-forward width: ``ffn_hidden``, else 4 n_embd (SwiGLU: 2/3 of that)."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return swiglu_hidden(self.n_embd) if self.ffn == "swiglu" else 4 * self.n_embd

    @classmethod
    def gpt2(cls, size: str = "124M", **overrides) -> GPTConfig:
        """The published GPT-2 shapes: "124M", "355M", "774M", "1558M" (or HF names)."""
        key = GPT2_ALIASES.get(size, size)
        if key not in GPT2_SIZES:
            names = sorted(GPT2_SIZES) + sorted(GPT2_ALIASES)
            raise ValueError(f"unknown GPT-2 size {size!r}; choose from {names}")
        n_layer, n_head, n_embd = GPT2_SIZES[key]
        base = dict(vocab_size=50257, context_length=1024, n_layer=n_layer)
        base |= dict(n_head=n_head, n_embd=n_embd)
        return cls(**(base | overrides))


# ---------------------------------------------------------------------------- pieces


class RMSNorm(nn.Module):
    """Root-mean-square norm: rescale each vector to unit RMS, no mean subtraction."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = x.pow(2).mean(dim=-1, keepdim=True).add(self.eps).sqrt()
        return x / rms * self.weight


def make_norm(config: GPTConfig) -> nn.Module:
    """LayerNorm (GPT-2) or RMSNorm (Llama) over the embedding dimension."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


class MLP(nn.Module):
    """GPT-2's feed-forward: widen (4x by default), GELU, project back."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        # GPT-2 was trained with the tanh approximation of GELU; exact GELU would
        # shift loaded GPT-2 logits by ~1e-3
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gelu(apply_linear(self.c_fc, x))
        return self.dropout(apply_linear(self.c_proj, h))


def swiglu_hidden(n_embd: int) -> int:
    """SwiGLU width: 2/3 of 4*n_embd (parameters of the GELU MLP), multiple of 8."""
    return 8 * math.ceil(8 * n_embd / 3 / 8)


class SwiGLU(nn.Module):
    """Llama's feed-forward: silu(x W_gate) * (x W_up), projected back."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        # gate and up projections in one matmul, like c_attn holds q, k and v
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = apply_linear(self.c_fc, x).chunk(2, dim=-1)
        return self.dropout(apply_linear(self.c_proj, F.silu(gate) * up))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = MultiHeadAttention.from_config(config)
        self.ln_2 = make_norm(config)
        self.mlp = SwiGLU(config) if config.ffn == "swiglu" else MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_weights: bool = False,
        cache=None,
        recompute=None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if recompute is not None:  # selective: only the attention is recomputed
            a, weights = recompute(self._attention, x, attn_mask, position_ids), None
        else:
            a = self.attn(
                self.ln_1(x), attn_mask, position_ids, return_weights, cache=cache
            )
            a, weights = a if return_weights else (a, None)
        x = x + a  # the residual stream carries x unchanged
        x = x + self.mlp(self.ln_2(x))
        return (x, weights) if return_weights else x

    def _attention(self, x, attn_mask, position_ids) -> torch.Tensor:
        """The attention sublayer alone: what selective recomputation drops."""
        return self.attn(self.ln_1(x), attn_mask, position_ids)


def sinusoidal_table(context_length: int, n_embd: int) -> torch.Tensor:
    """The fixed (T, C) sin/cos position table of "Attention Is All You Need"."""
    pos = torch.arange(context_length).float()[:, None]
    inv_freq = 1.0 / 10000 ** (torch.arange(0, n_embd, 2).float() / n_embd)
    table = torch.zeros(context_length, n_embd)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq[: n_embd // 2])
    return table


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode (no dropout) inside the block, back in its previous
    mode after it, also when the block raises or is interrupted."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _torch_checkpoint(function, *args) -> torch.Tensor:
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)


# activation checkpointing: PyTorch's, or the course's own (chapter 5)
RECOMPUTE = {"torch": _torch_checkpoint, "course": checkpoint}


# ---------------------------------------------------------------------------- GPT


class GPT(nn.Module):
    """A decoder-only transformer language model (GPT-2 and its modern variants)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        layers = dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=make_norm(config),
        )
        if config.pos_encoding == "learned":
            layers["wpe"] = nn.Embedding(config.context_length, config.n_embd)
        self.transformer = nn.ModuleDict(layers)
        if config.pos_encoding == "sinusoidal":
            table = sinusoidal_table(config.context_length, config.n_embd)
            self.register_buffer("pos_table", table, persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # activation checkpointing (chapter 5): see set_activation_checkpointing
        self.checkpoint_blocks, self.checkpoint_part = 0, "block"
        self._recompute = RECOMPUTE["torch"]
        self.loss_chunk = 0  # rows per chunk of the training loss (0: all at once)
        if config.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2: each residual projection is scaled by 1/sqrt(2 n_layer) so the residual
        # stream's variance does not grow with depth (2 additions per block)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (tied weights once); optionally without position and
        token-embedding tables (an untied output head still counts)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.transformer.wte.weight.numel()
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
        return n

    def _embed(
        self, idx: torch.Tensor, position_ids: torch.Tensor | None
    ) -> torch.Tensor:
        if idx.dim() != 2:
            raise ValueError(
                f"idx must be (batch, time) token ids, got shape {tuple(idx.shape)}"
            )
        if idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"idx must hold integer token ids, got {idx.dtype}")
        check_in_range(idx, self.config.vocab_size, "token ids", " (wrong tokenizer?)")
        t = idx.size(1)
        check_positions(
            t if position_ids is None else position_ids, self.config.context_length
        )
        if position_ids is None:
            position_ids = torch.arange(t, device=idx.device)
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.pos_encoding == "learned":
            x = x + self.transformer.wpe(position_ids)
        elif self.config.pos_encoding == "sinusoidal":
            x = x + self.pos_table[position_ids]
        # RoPE: positions enter inside attention, by rotating queries and keys
        return self.transformer.drop(x)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache=None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, vocab); with ``targets`` also the mean cross-entropy (nats).

        ``attention_mask``: (B, T) with 1/True for real tokens and 0/False for
        padding, or any boolean mask (B, T, T) / (B, 1 or n_head, T, T) of what each
        query may attend to; causality is always added. ``position_ids`` (B, T) or
        (T,), default ``0..T-1``: for left-padded rows use
        ``position_ids_from_mask(attention_mask)`` so every row starts at 0. Targets
        of -100 (e.g. padding) are left out of the loss.

        ``kv_cache`` (a ``shared.generation.KVCache``): ``idx`` continues the tokens
        already cached; positions default to ``cached .. cached + T - 1``, a (B, T)
        ``attention_mask`` must cover the cached tokens too, and the cache keeps
        this call's keys and values (inference: prefill, then one token at a time).
        """
        if kv_cache is not None and position_ids is None:
            start = kv_cache.length
            position_ids = torch.arange(start, start + idx.size(1), device=idx.device)
        x = self._embed(idx, position_ids)
        mask = expand_attention_mask(attention_mask)
        recompute = self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.transformer.h):
            if recompute and i < self.checkpoint_blocks:
                if self.checkpoint_part == "block":
                    # keep only the block's input; backward runs the block again
                    x = self._recompute(block, x, mask, position_ids)
                else:  # keep the MLP's activations, recompute the attention's
                    x = block(x, mask, position_ids, recompute=self._recompute)
            else:
                layer = kv_cache.layer(i) if kv_cache is not None else None
                x = block(x, mask, position_ids, cache=layer)
        if kv_cache is not None:
            kv_cache.advance(idx.size(1))
        x = self.transformer.ln_f(x)
        if targets is not None and self.loss_chunk and self.training:
            # chapter 5: the loss without the (B*T, V) logits; none are returned
            w = self.lm_head.weight
            return None, chunked_cross_entropy(x, w, targets, self.loss_chunk)
        logits = apply_linear(self.lm_head, x)  # decode: attention.decode_weight
        if targets is None:
            return logits
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100
        )
        return logits, loss

    def set_chunked_loss(self, chunk: int = 1024) -> GPT:
        """Compute the training loss ``chunk`` rows at a time (0: off); ``forward``
        then returns ``(None, loss)`` in training mode. Returns the model."""
        if chunk < 0:
            raise ValueError(f"chunk must be >= 0, got {chunk}")
        self.loss_chunk = int(chunk)
        return self

    def set_activation_checkpointing(
        self, n_blocks: int | bool = True, part: str = "block", impl: str = "torch"
    ) -> GPT:
        """Recompute the first ``n_blocks`` blocks in backward instead of storing their
        activations (``True``: all of them); returns the model.

        ``part="attention"`` recomputes only each block's attention sublayer
        (selective recomputation); ``impl`` is ``"torch"`` (``torch.utils.checkpoint``)
        or ``"course"`` (``shared.recompute.checkpoint``, the same gradients).
        """
        n = self.config.n_layer if n_blocks is True else int(n_blocks)
        if not 0 <= n <= self.config.n_layer:
            raise ValueError(f"n_blocks must be in 0..{self.config.n_layer}, got {n}")
        if part not in ("block", "attention") or impl not in RECOMPUTE:
            raise ValueError(
                f"part must be 'block' or 'attention' and impl one of "
                f"{list(RECOMPUTE)}; got {part!r}, {impl!r}"
            )
        self.checkpoint_blocks, self.checkpoint_part = n, part
        self._recompute = RECOMPUTE[impl]
        return self

    @torch.no_grad()
    def attention_maps(
        self,
        idx: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention weights of every layer and head: (n_layer, B, n_head, T, T)."""
        with evaluating(self):
            x = self._embed(idx, position_ids)
            mask = expand_attention_mask(attention_mask)
            maps = []
            for block in self.transformer.h:
                x, weights = block(x, mask, position_ids, return_weights=True)
                maps.append(weights)
        return torch.stack(maps)
