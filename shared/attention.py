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

IMPLS = ("fused", "explicit")  # the attention implementations, default first


def causal_mask(t_q: int, t_k: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean (t_q, t_k) mask, True where a query may NOT look (the future).

    Queries are the last ``t_q`` positions of the ``t_k`` keys, so the same mask also
    works when new queries attend to cached keys (``t_q < t_k``).
    """
    ones = torch.ones(t_q, t_k, dtype=torch.bool, device=device)
    return torch.triu(ones, diagonal=1 + t_k - t_q)


def check_in_range(values: torch.Tensor, high: int, what: str, hint: str = "") -> None:
    """Raise ValueError unless every value is in ``[0, high)``.

    On an accelerator the check runs on the device (``torch._assert_async``): asking
    the host for a min and a max would stall every forward pass until the device
    catches up (a compiled graph, too, keeps the check inside instead of breaking
    there). On the CPU there is nothing to wait for, and the error can say more.
    """
    if values.device.type != "cpu" or torch.compiler.is_compiling():
        ok = ((values >= 0) & (values < high)).all()
        torch._assert_async(ok, f"{what} must be in [0, {high}){hint}")
    elif values.numel():  # one reduction (aminmax): 3 us a call instead of 7
        low, top = (int(m) for m in torch.aminmax(values))
        if low < 0 or top >= high:
            raise ValueError(
                f"{what} must be in [0, {high}); got min {low}, max {top}{hint}"
            )


def check_positions(positions: int | torch.Tensor, context_length: int) -> None:
    """Clear error for a sequence or position ids past ``context_length``."""
    if not isinstance(positions, int):
        return check_in_range(positions, context_length, "position ids")
    if positions > context_length:
        raise ValueError(
            f"sequence of {positions} tokens is longer than context_length="
            f"{context_length}; crop it (e.g. idx[:, -context_length:])"
        )


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    impl: str = "fused",
    dropout_p: float = 0.0,
    return_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal scaled dot-product attention on (..., T, d) tensors.

    ``attn_mask`` (boolean, broadcastable to (..., T_q, T_k), True where a query MAY
    attend, as in ``F.scaled_dot_product_attention``) is combined with causality, e.g.
    a padding mask (B, 1, 1, T_k). A query left with no key to attend to (a padding
    row) gets an output of zeros, not NaN. ``impl="explicit"`` computes the weights by
    hand; ``"fused"`` uses PyTorch's kernel. ``dropout_p`` is applied as given (pass
    0.0 in eval mode). With ``return_weights`` (explicit only) also return the softmax
    weights (..., T_q, T_k), before dropout.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if return_weights and impl == "fused":
        raise ValueError(
            "return_weights needs impl='explicit' (the fused kernel hides them)"
        )
    t_q, t_k = q.size(-2), k.size(-2)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        raise TypeError(f"attn_mask must be boolean, got {attn_mask.dtype}")
    # no mask to build in the common cases (a decode step: 5 us a layer saved)
    if impl == "fused" and attn_mask is None:
        if t_q == t_k:  # the kernel's own causal path
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout_p, is_causal=True
            )
        if t_q == 1:  # one new token sees every cached key
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    # queries are the last t_q positions: bottom-right aligned causality (KV caches)
    allowed = ~causal_mask(t_q, t_k, q.device)
    if attn_mask is not None:
        allowed = allowed & attn_mask
    if impl == "fused":
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=dropout_p
        )
        return _zero_empty_rows(out, allowed) if attn_mask is not None else out

    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (..., T_q, T_k)
    # mask BEFORE softmax: -inf becomes exactly 0 weight and the rows still sum to 1
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if attn_mask is not None:  # a row of only -inf is NaN after softmax
        weights = _zero_empty_rows(weights, allowed)
    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    out = dropped @ v
    return (out, weights) if return_weights else out


def _zero_empty_rows(x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Zero the rows (queries) of ``x`` that may attend to no key at all."""
    return x.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)


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
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate (..., T, head_dim) queries or keys by their positions (rotate-half).

    Positions are ``0..T-1`` unless ``position_ids`` (T,) or (B, T) says otherwise,
    e.g. for left-padded rows or new tokens after a KV cache.
    """
    if position_ids is None:
        cos, sin = cos[: x.size(-2)], sin[: x.size(-2)]
    else:
        cos, sin = cos[position_ids], sin[position_ids]  # (T, hd) or (B, T, hd)
        if position_ids.dim() == 2:  # one row of positions per sequence: add heads
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


# ------------------------------------------------------------ decode-step weights

DECODE_ROWS = 2  # a decode step of one or two sequences multiplies that many rows


def apply_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``; in a CPU decode step, the same product through ``decode_weight``.

    A decode step multiplies one row per sequence by every weight matrix: a
    matrix-vector product that reads each weight once and does 2 FLOPs with it, so
    its speed is the speed of reading the weights. ``nn.Linear`` stores a weight
    (out, in) and the kernel computes ``out`` dot products of length ``in``; GPT-2's
    Conv1D (Hugging Face's layout) stores it (in, out) and the kernel adds up ``in``
    scaled rows of length ``out``. Same numbers, other order in memory; on this CPU
    (MKL, fp32, one thread; ``chapters/09_inference/profile_decode.py``) one row
    times GPT-2 small's 12 c_attn weights takes 6.6 ms (out, in) and 5.0 ms (in,
    out), attn.c_proj 2.3 and 2.0, c_fc 8.9 and 6.0, the lm_head 11.7 and 6.6, but
    mlp.c_proj, whose rows are long (3072 -> 768), 6.2 and 7.9. With two rows the
    (in, out) copy wins too (24 c_fc: 33 and 18 ms); from four rows on MKL's matrix
    kernel takes over and (out, in) is faster (25 and 31). So a no-gradient call of
    at most ``DECODE_ROWS`` rows through an fp32 CPU ``nn.Linear`` with ``in <= out``
    uses an (in, out) copy of its weight: a whole decode step of GPT-2 small went
    from 43 to 34 ms of CPU time (transformers: 42). Training, prefill, other
    devices, wrapped layers (LoRA, int8) and layers with forward hooks (head
    ablation, ``shared.evaluation.heads``) run ``layer(x)`` as before.
    """
    if (
        type(layer) is not nn.Linear  # LoRA, int8 ... layers run their own forward
        or torch.is_grad_enabled()  # gradients must reach the parameter itself
        or x.numel() > DECODE_ROWS * x.size(-1)
        or layer._forward_pre_hooks  # hooks (e.g. head ablation) run in layer(x)
        or layer._forward_hooks
        or torch.compiler.is_compiling()
    ):
        return layer(x)
    w_t = decode_weight(layer)
    # F.linear computes x @ weight.t(): handed w_t.t(), it multiplies by w_t itself
    return layer(x) if w_t is None else F.linear(x, w_t.t(), layer.bias)


def decode_weight(layer: nn.Linear) -> torch.Tensor | None:
    """The layer's weight transposed to (in, out), contiguous, or None where no copy
    pays or is allowed: ``in > out``, not fp32 on the CPU, ``set_decode_copies``
    off, or weights made in ``torch.inference_mode`` (no version counter).

    Made on first use and kept on the layer (not a parameter or buffer: state dicts
    do not see it), made again when the weight changes: a new tensor (``.to()``,
    ``load_state_dict(assign=True)``) or an in-place write, which bumps the tensor's
    version counter (optimizer steps, ``load_state_dict``, ``torch.no_grad()`` ops).
    A write through ``.data`` bypasses the counter: call ``set_decode_copies(model)``
    after one. Memory: one more copy of each such weight, 381 MB for GPT-2 124M in
    fp32 (+77%): 226 MB for the blocks, 154 MB for the output layer.
    """
    w = layer.weight
    if w.is_inference():
        return None
    key = (w.data_ptr(), w._version)
    cached = layer.__dict__.get("_decode_copy")
    if cached is None or cached[0] != key:  # first use, or the weight changed
        wanted = (
            layer.__dict__.get("decode_copy", True)  # set_decode_copies
            and layer.in_features <= layer.out_features  # short rows
            and w.device.type == "cpu"  # where it was measured
            and w.dtype == torch.float32
            # a tensor subclass (torchao's quantized weights) computes its own way
            and not hasattr(w, "__tensor_flatten__")
        )
        w_t = w.detach().t().contiguous() if wanted else None
        cached = layer._decode_copy = (key, w_t)
    return cached[1]


def set_decode_copies(model: nn.Module, enabled: bool = True) -> None:
    """Allow decode steps to keep (in, out) weight copies (the default) or forbid
    them; either way the copies held now are dropped, so after a write through
    ``.data`` this makes the next decode step copy the new weights."""
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            layer.decode_copy = enabled
            layer.__dict__.pop("_decode_copy", None)


def decode_copy_bytes(model: nn.Module) -> int:
    """Bytes the decode-step weight copies of ``model`` hold now."""
    copies = (vars(m).get("_decode_copy", (0, None))[1] for m in model.modules())
    return sum(c.nbytes for c in copies if c is not None)


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
        n_kv_head: int | None = None,
    ) -> None:
        super().__init__()
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if d_in % n_head:
            raise ValueError(f"n_embd={d_in} must be divisible by n_head={n_head}")
        if n_kv_head < 1 or n_head % n_kv_head:
            raise ValueError(
                f"n_head={n_head} must be a multiple of n_kv_head={n_kv_head}"
            )
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.n_head, self.n_embd, self.head_dim = n_head, d_in, d_in // n_head
        # grouped-query attention: n_kv_head key/value heads, each shared by
        # n_head // n_kv_head query heads (= n_head: multi-head, 1: multi-query)
        self.n_kv_head = n_kv_head
        self.context_length, self.dropout, self.impl = context_length, dropout, impl
        kv_dim = n_kv_head * self.head_dim
        # q, k, v in one matmul: [q (n_embd) | k (kv_dim) | v (kv_dim)] outputs
        self.c_attn = nn.Linear(d_in, d_in + 2 * kv_dim, bias=bias)
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
        return cls(
            d_in=config.n_embd,
            n_head=config.n_head,
            context_length=config.context_length,
            dropout=config.dropout,
            bias=config.bias,
            rope=config.pos_encoding == "rope",
            impl=config.attn_impl,
            rope_base=config.rope_base,
            n_kv_head=getattr(config, "n_kv_head", None),
        )

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_weights: bool = False,
        impl: str | None = None,
        cache=None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, T, C) -> (B, T, C); with ``return_weights`` also (B, n_head, T, T).

        ``attn_mask``: boolean, True where a query may attend, broadcastable to
        (B, n_head, T, T_k), combined with the causal mask. ``position_ids`` place the
        tokens for RoPE (default ``0..T-1``). ``cache`` (one layer of a
        ``shared.generation.KVCache``) stores this call's keys and values after the
        earlier ones, and the queries attend to all of them (``T_k`` = cached + T).
        """
        b, t, _ = x.shape
        check_positions(t, self.context_length)
        if self.rope and position_ids is not None:  # they index the rotation tables
            check_positions(position_ids, self.context_length)
        kv_dim = self.n_kv_head * self.head_dim
        q, k, v = apply_linear(self.c_attn, x).split(
            [self.n_embd, kv_dim, kv_dim], dim=2
        )
        # (B, T, C) -> (B, heads, T, head_dim): each head attends independently
        q = q.view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k, v = (
            z.view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2) for z in (k, v)
        )
        if self.rope:
            q = apply_rope(q, self.rope_cos, self.rope_sin, position_ids)
            k = apply_rope(k, self.rope_cos, self.rope_sin, position_ids)
        if cache is not None:  # keys and values of the earlier tokens, then these
            k, v = cache.update(k, v)  # the cache holds n_kv_head heads: GQA's saving
        k, v = (
            repeat_kv(k, self.n_head // self.n_kv_head),
            repeat_kv(v, self.n_head // self.n_kv_head),
        )
        impl = "explicit" if return_weights else (impl or self.impl)
        p = self.dropout if self.training else 0.0
        result = causal_attention(
            q, k, v, attn_mask=attn_mask, impl=impl, dropout_p=p,
            return_weights=return_weights,
        )  # fmt: skip
        out, weights = result if return_weights else (result, None)
        # concatenate the heads (n_embd: this rank's share under tensor parallelism)
        out = out.transpose(1, 2).contiguous().view(b, t, self.n_embd)
        out = self.resid_dropout(apply_linear(self.c_proj, out))
        return (out, weights) if return_weights else out


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, n_kv_head, T, d) -> (B, n_kv_head * groups, T, d): key/value head j serves
    query heads j * groups .. j * groups + groups - 1 (Llama's layout)."""
    if groups == 1:
        return x
    return x.repeat_interleave(groups, dim=1)


def expand_attention_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A (B, T) padding mask or (B, T, T) mask as boolean (B, 1, T_q, T_k), True = see.

    A (B, T) mask marks the keys every query may see; broadcasting adds the heads
    and the queries.
    """
    if mask is None:
        return None
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    elif mask.dim() == 3:
        mask = mask[:, None]
    elif mask.dim() != 4:
        raise ValueError(
            "attention_mask must be (B, T), (B, T, T) or (B, heads, T, T); "
            f"got shape {tuple(mask.shape)}"
        )
    return mask if mask.dtype == torch.bool else mask != 0


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions (B, T) that count only real tokens: left padding starts at 0.

    ``[[0, 0, 1, 1, 1]] -> [[0, 0, 0, 1, 2]]`` (padding gets position 0, unused).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
