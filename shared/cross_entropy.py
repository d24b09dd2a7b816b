"""Cross-entropy over a large vocabulary without the (N, V) logits.

A language model's last step multiplies N hidden states (N = B * T) by the (V, C)
output matrix and takes the cross-entropy of the (N, V) logits. At GPT-2's vocabulary
(V = 50,257) those logits, their float32 copy, the log-probabilities and the gradient
are each 200 KB per token: they, not the model, set the peak of a small model's step.
``ChunkedCrossEntropy`` computes the same loss ``chunk`` rows at a time: forward keeps
only each row's log-sum-exp, backward recomputes a chunk's logits and turns them into
the gradient ``softmax - one_hot`` right away. At most one (chunk, V) block exists.
"""

from __future__ import annotations

import torch

IGNORE = -100  # the target that counts for nothing (as in F.cross_entropy)


class ChunkedCrossEntropy(torch.autograd.Function):
    """``ChunkedCrossEntropy.apply(hidden, weight, targets, chunk)``: the mean of
    ``F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100)``.

    hidden (N, C), weight (V, C), targets (N,). The logits are computed in float32
    (float64 for float64 inputs), as the course's GPT computes its loss.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int = 1024) -> torch.Tensor:
        n, dtype = hidden.size(0), torch.promote_types(hidden.dtype, torch.float32)
        lse = torch.empty(n, dtype=dtype, device=hidden.device)
        picked = torch.zeros(n, dtype=dtype, device=hidden.device)
        valid = targets != IGNORE
        for i in range(0, n, chunk):
            logits = (hidden[i : i + chunk] @ weight.T).to(dtype)  # (chunk, V)
            lse[i : i + chunk] = torch.logsumexp(logits, dim=-1)
            t, ok = targets[i : i + chunk], valid[i : i + chunk]
            picked[i : i + chunk][ok] = logits[ok, t[ok]]
        count = valid.sum()
        ctx.save_for_backward(hidden, weight, targets, lse, count)
        ctx.chunk = chunk
        return ((lse - picked) * valid).sum() / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        hidden, weight, targets, lse, count = ctx.saved_tensors
        dtype = lse.dtype
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
        for i in range(0, hidden.size(0), ctx.chunk):
            h, t = hidden[i : i + ctx.chunk], targets[i : i + ctx.chunk]
            # d loss / d logits = (softmax - one_hot) / count, on rows that count
            g = torch.exp((h @ weight.T).to(dtype) - lse[i : i + ctx.chunk, None])
            ok = t != IGNORE
            g[ok, t[ok]] -= 1.0
            g *= (ok.to(dtype) / count * grad_loss)[:, None]  # not in float32
            grad_hidden[i : i + ctx.chunk] = (g @ weight.to(dtype)).to(hidden.dtype)
            grad_weight += g.T @ h.to(dtype)
        return grad_hidden, grad_weight.to(weight.dtype), None, None


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, in chunks of
    ``chunk`` rows; (B, T, C) hidden states and (B, T) targets are flattened."""
    return ChunkedCrossEntropy.apply(
        hidden.flatten(0, -2), weight, targets.flatten(), chunk
    )
