"""Attention from scratch, twice: the textbook formula with PyTorch's signature, and
FlashAttention-2 (Dao, 2023) written in PyTorch.

``scaled_dot_product_attention`` computes ``softmax(q k^T * scale + mask) v`` with the
whole (T_q, T_k) matrix in memory, exactly as ``F.scaled_dot_product_attention``
defines it. ``FlashAttention`` computes the same numbers in tiles: for each block of
queries it walks over the blocks of keys, keeping a running maximum ``m``, a running
sum ``l`` of the exponentials and an unnormalised output (the *online softmax*), so
no (T_q, T_k) matrix ever exists. It saves only q, k, v, the output and the
log-sum-exp ``L = m + log l`` of each row; backward recomputes each tile's
probabilities from ``L``. Memory grows as O(T), not O(T^2). In Python the tiles are
separate kernel launches, so on a CPU it is slower than one big matrix product; the
real kernel fuses the loop into one GPU kernel that keeps tiles in on-chip SRAM.
"""

from __future__ import annotations

import math

import torch

BLOCK = 64  # tile size (rows of queries and of keys) when none is given


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention``'s semantics, by hand, on (..., T, d).

    ``attn_mask``: boolean (True: may attend) or float (added to the scores),
    broadcastable to (..., T_q, T_k). ``is_causal``: query ``i`` sees keys ``0..i``
    (PyTorch's top-left alignment). ``scale`` defaults to ``1 / sqrt(d)``.
    """
    if is_causal and attn_mask is not None:
        raise ValueError("give attn_mask or is_causal, not both (as PyTorch)")
    t_q, t_k = query.size(-2), key.size(-2)
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * scale
    if is_causal:
        see = torch.ones(t_q, t_k, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~see, float("-inf"))
    elif attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        scores = scores + attn_mask
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = torch.nn.functional.dropout(weights, p=dropout_p)
    return weights @ value


def _tile_scores(
    q: torch.Tensor, k: torch.Tensor, i: int, j: int, scale: float, causal: bool
) -> torch.Tensor:
    """Scores of query rows ``i..`` against key columns ``j..``, future masked."""
    s = (q @ k.transpose(-2, -1)) * scale
    if causal:
        rows = torch.arange(i, i + q.size(-2), device=q.device)[:, None]
        cols = torch.arange(j, j + k.size(-2), device=q.device)[None, :]
        s = s.masked_fill(cols > rows, float("-inf"))
    return s


class FlashAttention(torch.autograd.Function):
    """FlashAttention-2 in PyTorch: ``FlashAttention.apply(q, k, v, is_causal)``.

    q (..., T_q, d), k and v (..., T_k, d); any T (the last tile may be short).
    Equal to ``scaled_dot_product_attention(q, k, v, is_causal=is_causal)``.
    """

    @staticmethod
    def forward(
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        is_causal: bool = False,
        block_q: int = BLOCK,
        block_k: int = BLOCK,
    ) -> torch.Tensor:
        scale = 1.0 / math.sqrt(q.size(-1))
        t_q, t_k = q.size(-2), k.size(-2)
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=q.dtype, device=q.device)
        for i in range(0, t_q, block_q):
            qi = q[..., i : i + block_q, :]
            m = torch.full(qi.shape[:-1], float("-inf"), dtype=q.dtype, device=q.device)
            l = torch.zeros_like(m)  # noqa: E741 (the paper's name)
            acc = torch.zeros_like(qi)
            # causal: key blocks past the tile's last query row hold only the future
            stop = min(t_k, i + qi.size(-2)) if is_causal else t_k
            for j in range(0, stop, block_k):
                s = _tile_scores(qi, k[..., j : j + block_k, :], i, j, scale, is_causal)
                m_new = torch.maximum(m, s.amax(dim=-1))
                p = torch.exp(s - m_new[..., None])  # this tile, rescaled to m_new
                alpha = torch.exp(m - m_new)  # how much the old maximum shrinks
                l = alpha * l + p.sum(dim=-1)  # noqa: E741
                acc = alpha[..., None] * acc + p @ v[..., j : j + block_k, :]
                m = m_new
            out[..., i : i + block_q, :] = acc / l[..., None]
            lse[..., i : i + block_q] = m + torch.log(l)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.is_causal, ctx.blocks = is_causal, (block_q, block_k)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        block_q, block_k = ctx.blocks
        scale = 1.0 / math.sqrt(q.size(-1))
        t_q, t_k = q.size(-2), k.size(-2)
        # D_i = sum_j P_ij dP_ij = rowsum(dO * O): the softmax backward's correction
        delta = (grad_out * out).sum(dim=-1)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for j in range(0, t_k, block_k):
            kj, vj = k[..., j : j + block_k, :], v[..., j : j + block_k, :]
            first = j if ctx.is_causal else 0  # earlier queries cannot see this block
            for i in range(first - first % block_q, t_q, block_q):
                qi = q[..., i : i + block_q, :]
                s = _tile_scores(qi, kj, i, j, scale, ctx.is_causal)
                p = torch.exp(s - lse[..., i : i + block_q, None])  # recomputed
                do = grad_out[..., i : i + block_q, :]
                dv[..., j : j + block_k, :] += p.transpose(-2, -1) @ do
                dp = do @ vj.transpose(-2, -1)
                ds = p * (dp - delta[..., i : i + block_q, None])
                dq[..., i : i + block_q, :] += (ds @ kj) * scale
                dk[..., j : j + block_k, :] += (ds.transpose(-2, -1) @ qi) * scale
        return dq, dk, dv, None, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_causal: bool = False,
    block_size: int = BLOCK,
) -> torch.Tensor:
    """``FlashAttention.apply`` with one tile size for queries and keys."""
    return FlashAttention.apply(q, k, v, is_causal, block_size, block_size)
