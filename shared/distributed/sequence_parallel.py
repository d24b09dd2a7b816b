"""Sequence (context) parallelism: one long sequence split over N ranks, attention
computed with ring attention (Liu et al., 2023) or DeepSpeed-Ulysses' all-to-all.

Rank r holds positions ``[r T/N, (r+1) T/N)`` of every sequence. Everything in a
transformer except attention works token by token (embeddings, norms, the MLP, the
head and the loss), so each rank runs those on its own slice without talking to
anyone. Attention mixes tokens: every query needs the keys and values of all earlier
positions, which live on other ranks.

**Ring attention** moves the keys and values, never the queries. The ranks form a
ring; at each of N steps a rank combines its queries with the K/V block it holds,
using FlashAttention's online softmax (``shared.flash_attention``: a running maximum
``m``, a running sum ``l`` and an unnormalised output ``acc``), then hands the block
to rank r+1 and takes one from rank r-1. After N-1 hand-overs every query has seen
every block. The transfer of the next block overlaps with the current block's
compute. Backward goes round the ring again with (k, v, dk, dv): each rank adds its
queries' share to the gradients of the block it holds, and after N steps every
block's dk, dv are home, complete; dq never leaves its rank.

Where it pays: long context. The activations of a layer (q, k, v, output, the MLP's
hidden states) grow with T, and each rank holds T/N of them; the attention compute
is split too, at most (T/N) x T scores per rank instead of T x T. A 1M-token
context that no single GPU can hold trains on N of them. The price is traffic:
every rank sends (N-1) K/V blocks per layer forward, 2 (N-1) T/N B H d numbers,
hidden behind the block computations when the blocks are large enough.

The causal load imbalance: with blocks in order, rank r's queries see r full blocks
and half of the diagonal one, while blocks from later ranks are all future and
skipped (still passed on). Rank 0 has half a block of visible scores to compute,
rank N-1 has N - 1/2 blocks; the ring runs at the speed of the busiest rank.
*Zig-zag* ordering fixes it: cut the sequence into 2N chunks and give rank r chunks
r and 2N-1-r, one early and one late, so every rank has the same number of visible
(query, key) pairs.

**DeepSpeed-Ulysses** (Jacobs et al., 2023) re-shards instead: one all-to-all turns
"all heads of T/N positions" into "H/N heads of all T positions", each rank runs
ordinary causal attention on its heads, and a second all-to-all turns the output
back. It needs the number of heads divisible by N (N <= H). Each rank sends
(N-1)/N of its q, k, v and output, 4 (N-1)/N^2 B H T d numbers per layer, against
the ring's 2 (N-1)/N B H T d: the same for N = 2, N/2 times less beyond. Any
attention kernel works unchanged on the whole heads; the ring scales past N = H and
never needs all T keys on one rank.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from shared.attention import apply_rope, causal_attention, causal_mask


def rank_and_size(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size; (0, 1) without one."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def sequence_slice(length: int, group: dist.ProcessGroup | None = None) -> slice:
    """The positions ``[r T/N, (r+1) T/N)`` this rank holds of a length-T sequence."""
    rank, n = rank_and_size(group)
    if length % n:
        raise ValueError(f"sequence length {length} must be divisible by N={n}")
    step = length // n
    return slice(rank * step, (rank + 1) * step)


# ---------------------------------------------------------------------------- blocks


def _scores(q: torch.Tensor, k: torch.Tensor, diagonal: bool) -> torch.Tensor:
    """Scaled scores of a (query block, key block) pair; the diagonal block masked.

    On the diagonal, query block and key block cover the same positions, so the mask
    is the usual causal one. Blocks from earlier ranks are all past: no mask.
    """
    s = (q / math.sqrt(q.size(-1))) @ k.transpose(-2, -1)  # scale the smaller one
    if diagonal:  # in place, as below: (T/N)^2 blocks are the big tensors here
        s.masked_fill_(causal_mask(q.size(-2), k.size(-2), q.device), float("-inf"))
    return s


def online_softmax_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    m: torch.Tensor,
    l: torch.Tensor,  # noqa: E741 (the paper's name)
    acc: torch.Tensor,
    diagonal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold one block of keys and values into the running softmax of queries ``q``.

    ``m`` (..., T_q): the largest score so far; ``l``: the sum of exp(score - m);
    ``acc`` (..., T_q, d): the sum of exp(score - m) v. A new maximum rescales the old
    sums by exp(m_old - m_new). Start from m = -inf, l = 0, acc = 0 and fold a block
    that every query sees part of first (the diagonal); finish with acc / l.
    """
    s = _scores(q, k, diagonal)
    m_new = torch.maximum(m, s.amax(dim=-1))
    p = s.sub_(m_new[..., None]).exp_()  # this block, relative to the new maximum
    alpha = torch.exp(m - m_new)  # how much the old maximum shrinks
    return m_new, alpha * l + p.sum(dim=-1), alpha[..., None] * acc + p @ v


def _pass_on(
    tensors: list[torch.Tensor], group: dist.ProcessGroup | None, rank: int, n: int
) -> tuple[list[torch.Tensor], list]:
    """Start sending ``tensors`` to rank r+1 and receiving rank r-1's into new buffers.

    Returns the buffers and the requests to ``wait()`` on; until then the buffers
    are not filled and ``tensors`` must not change.
    """
    received = [torch.empty_like(t, memory_format=torch.contiguous_format)
                for t in tensors]  # fmt: skip
    ops = [dist.P2POp(dist.isend, t, group=group, group_peer=(rank + 1) % n)
           for t in tensors]  # fmt: skip
    ops += [dist.P2POp(dist.irecv, t, group=group, group_peer=(rank - 1) % n)
            for t in received]  # fmt: skip
    return received, dist.batch_isend_irecv(ops)


def _wait(requests: list) -> None:
    for request in requests:
        request.wait()


# ---------------------------------------------------------------------------- ring


class RingAttention(torch.autograd.Function):
    """Causal attention over a sequence split across a group: ``ring_attention``."""

    @staticmethod
    def forward(ctx, q, k, v, group):
        rank, n = rank_and_size(group)
        k, v = k.contiguous(), v.contiguous()  # sent as they are: no strided views
        m = torch.full(q.shape[:-1], float("-inf"), dtype=q.dtype, device=q.device)
        state = (m, torch.zeros_like(m), torch.zeros_like(q))  # m, l, acc
        kv = [k, v]
        for step in range(n):
            source = (rank - step) % n  # whose positions the block holds
            if step < n - 1:  # the next block travels while this one is computed
                next_kv, requests = _pass_on(kv, group, rank, n)
            if source <= rank:  # later ranks' blocks are all future: skipped
                state = online_softmax_step(q, *kv, *state, diagonal=source == rank)
            if step < n - 1:
                _wait(requests)
                kv = next_kv
        m, l, acc = state  # noqa: E741
        out = acc / l[..., None]
        lse = m + torch.log(l)  # log-sum-exp: all backward needs of the softmax
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group = group
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        rank, n = rank_and_size(ctx.group)
        scale = 1.0 / math.sqrt(q.size(-1))
        grad_out = grad_out.contiguous()
        # D_i = sum_j P_ij dP_ij = rowsum(dO * O): the softmax backward's correction
        delta = (grad_out * out).sum(dim=-1)
        dq = torch.zeros_like(q)
        kv, dkv = [k, v], [torch.zeros_like(k), torch.zeros_like(v)]
        for step in range(n):
            source = (rank - step) % n
            if step < n - 1:  # k, v are known now: send them during the compute
                next_kv, kv_requests = _pass_on(kv, ctx.group, rank, n)
            if source <= rank:
                (kb, vb), (dk, dv) = kv, dkv
                # the block's probabilities again, from the log-sum-exp
                p = _scores(q, kb, source == rank).sub_(lse[..., None]).exp_()
                dv += p.transpose(-2, -1) @ grad_out
                dp = grad_out @ vb.transpose(-2, -1)
                ds = dp.sub_(delta[..., None]).mul_(p)  # dS = P * (dP - D)
                dq += (ds @ kb) * scale
                dk += (ds.transpose(-2, -1) @ q) * scale
            if n > 1:  # dk, dv follow their block; after N hand-overs they are home
                next_dkv, dkv_requests = _pass_on(dkv, ctx.group, rank, n)
                _wait(dkv_requests)
                dkv = next_dkv
            if step < n - 1:
                _wait(kv_requests)
                kv = next_kv
        return dq, dkv[0], dkv[1], None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Causal attention of a sequence split over the ranks of ``group`` (ring).

    q, k, v (B, H, T/N, d): rank r's positions ``[r T/N, (r+1) T/N)``. Returns this
    rank's (B, H, T/N, d) rows of ``causal_attention`` on the whole sequence, and
    gradients for this rank's q, k, v. Every rank must call it (a collective). Without
    a process group it is plain causal attention (N = 1). Sums run in the inputs'
    dtype (a production kernel accumulates half-precision inputs in float32).
    """
    return RingAttention.apply(q, k, v, group)


# ---------------------------------------------------------------------------- Ulysses


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` over dim 0 (N equal chunks: chunk j goes to rank j).

    Rank r receives chunk r of every rank, so the exchange is its own inverse: the
    gradient goes back with the same all-to-all.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_to_all(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.group), None


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()  # first: empty_like copies strides, the backend writes rows
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def _sequence_to_heads(x: torch.Tensor, group, n: int) -> torch.Tensor:
    """(B, H, T/N, d), all heads of my positions -> (B, H/N, T, d), my heads."""
    b, h, t, d = x.shape
    x = x.reshape(b, n, h // n, t, d).transpose(0, 1)  # chunk j: rank j's heads
    x = _AllToAll.apply(x, group)  # chunk i: rank i's positions
    return x.permute(1, 2, 0, 3, 4).reshape(b, h // n, n * t, d)


def _heads_to_sequence(x: torch.Tensor, group, n: int) -> torch.Tensor:
    """(B, H/N, T, d), my heads of all positions -> (B, H, T/N, d): the inverse."""
    b, h, length, d = x.shape
    x = x.reshape(b, h, n, length // n, d).permute(2, 0, 1, 3, 4)  # j: rank j's rows
    x = _AllToAll.apply(x, group)  # chunk i: head group i
    return x.transpose(0, 1).reshape(b, n * h, length // n, d)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Causal attention of a sequence split over ``group``, DeepSpeed-Ulysses style.

    Same inputs and result as ``ring_attention``: one all-to-all re-shards q, k, v
    from positions to heads, ``causal_attention`` runs on H/N whole heads, and one
    all-to-all shards the output back to positions. Needs H divisible by N.
    """
    _, n = rank_and_size(group)
    if q.size(1) % n:
        raise ValueError(f"Ulysses needs heads ({q.size(1)}) divisible by N={n}")
    if n == 1:
        return causal_attention(q, k, v)
    q, k, v = (_sequence_to_heads(z, group, n) for z in (q, k, v))
    return _heads_to_sequence(causal_attention(q, k, v), group, n)


# ---------------------------------------------------------------------------- GPT


def _attention_sublayer(
    attn: nn.Module, x, positions, group, attention
) -> torch.Tensor:
    """``MultiHeadAttention.forward`` on this rank's slice, with its own weights and
    a sequence-parallel ``attention`` in place of ``causal_attention``."""
    b, t, _ = x.shape
    if attn.n_kv_head != attn.n_head:
        raise NotImplementedError("sequence parallelism here runs multi-head attention")
    q, k, v = attn.c_attn(x).split(attn.n_embd, dim=2)
    q, k, v = (
        z.view(b, t, attn.n_head, attn.head_dim).transpose(1, 2) for z in (q, k, v)
    )
    if attn.rope:  # rotate by the absolute positions of this rank's tokens
        q = apply_rope(q, attn.rope_cos, attn.rope_sin, positions)
        k = apply_rope(k, attn.rope_cos, attn.rope_sin, positions)
    out = attention(q, k, v, group)
    out = out.transpose(1, 2).contiguous().view(b, t, attn.n_embd)
    return attn.resid_dropout(attn.c_proj(out))


def sequence_parallel_loss(
    model: nn.Module,
    idx: torch.Tensor,
    targets: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    attention=ring_attention,
) -> torch.Tensor:
    """This rank's share of the GPT's mean cross-entropy on (B, T) ``idx``.

    Every rank holds the whole model and the whole batch but computes only its T/N
    positions: embeddings at their absolute positions (learned, sinusoidal or RoPE),
    norms, MLPs, head and loss on its tokens, attention through each block's own
    ``c_attn``/``c_proj`` with ``attention`` (``ring_attention`` or
    ``ulysses_attention``) in between. The loss is the sum over local tokens divided
    by the number of targets in the whole batch, so the ranks' losses *sum* to the
    one-process mean, and so do their gradients: all-reduce them with a sum and no
    division (``allreduce_sequence_gradients``). Attention dropout is not applied,
    and activation checkpointing and the chunked loss are ignored.
    """
    if model.training and model.config.dropout > 0:
        raise ValueError("sequence_parallel_loss does not apply attention dropout")
    local = sequence_slice(idx.size(1), group)
    positions = torch.arange(local.start, local.stop, device=idx.device)
    x = model._embed(idx[:, local], positions)  # the GPT's embedding, our positions
    for block in model.transformer.h:
        a = _attention_sublayer(block.attn, block.ln_1(x), positions, group, attention)
        x = x + a
        x = x + block.mlp(block.ln_2(x))
    logits = model.lm_head(model.transformer.ln_f(x))
    # at least float32 (half-precision logits lose the loss), float64 kept
    logits = logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))
    total = F.cross_entropy(
        logits, targets[:, local].flatten(), ignore_index=-100, reduction="sum"
    )
    # the one-process mean divides by every counted target of the batch, not ours
    return total / (targets != -100).sum().clamp(min=1)


def allreduce_sequence_gradients(
    model: nn.Module, group: dist.ProcessGroup | None = None
) -> None:
    """Sum every gradient over the sequence-parallel ranks (no division).

    Each rank's gradient is the derivative of its share of the loss; the shares add
    up to the loss, so the gradients add up too. Data parallelism divides by N
    because each rank computed a whole mean; here nobody did. (With data parallelism
    on top, sum over the sequence group and average over the data group;
    ``D.allreduce_gradients(model, world_size=1)`` is the same sum on the world.)
    """
    if not dist.is_initialized():
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=group)
