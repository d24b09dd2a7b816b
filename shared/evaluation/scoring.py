"""Scoring text with a model: every token once in sliding windows (``score_tokens``:
loss, confidence, correctness, context) and lm-evaluation-harness's log-likelihood
requests (``loglikelihood`` of ``(context, continuation)`` pairs). ``encode_text`` is
the one rule by which every request's text becomes token ids."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from shared.loss import context_length_of
from shared.model import evaluating


def encode_text(tokenizer, text: str) -> list[int]:
    """A request's text as ids: ``<|endoftext|>`` written in it is that special token,
    as Hugging Face tokenizers (and so lm-evaluation-harness and the exported model)
    read it. Every scoring path of the course encodes through here."""
    return tokenizer.encode(text, allowed_special="all")


@dataclass
class TokenScores:
    """Per-token results of scoring a text: loss (nats), the model's top probability,
    whether its top choice was right, and how many tokens of context each one had."""

    loss: np.ndarray
    confidence: np.ndarray
    correct: np.ndarray
    context: np.ndarray

    def __len__(self) -> int:
        return len(self.loss)


def _windows(n: int, size: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` windows over ``n`` targets (inputs 0..n-1).

    Window ``[begin, end)`` of inputs predicts targets ``begin+1..end``; each target
    is scored by the first window that reaches it, ``stride`` new ones per window.
    """
    out, scored, begin = [], 0, 0
    while scored < n:
        end = min(begin + size, n)
        out.append((begin, end, scored))
        scored = end
        begin += stride
    return out


@torch.no_grad()
def score_tokens(
    model: nn.Module,
    ids,
    *,
    stride: int | None = None,
    context_length: int | None = None,
    batch_size: int = 32,
    temperature: float = 1.0,
) -> TokenScores:
    """Score every token of ``ids`` (but the first) once, in sliding windows.

    Windows of the model's context length start every ``stride`` tokens and score
    only the targets no earlier window reached, so every scored token (after the
    first window) sees at least ``context_length - stride`` tokens of context.
    ``stride=None`` means non-overlapping windows (stride = context length).
    ``temperature`` divides the logits first (calibration by temperature scaling).
    """
    T = context_length_of(model, context_length)
    stride = T if stride is None else stride
    if not 1 <= stride <= T:
        raise ValueError(f"stride must be in 1..{T}, got {stride}")
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    n = len(ids) - 1
    if n < 1:
        raise ValueError("need at least two tokens to score")
    device = next(model.parameters()).device
    loss, conf = np.zeros(n, np.float32), np.zeros(n, np.float32)
    correct, ctx = np.zeros(n, bool), np.zeros(n, np.int64)
    windows = _windows(n, T, stride)
    with evaluating(model):
        for i in range(0, len(windows), batch_size):
            group = windows[i : i + batch_size]
            width = max(e - b for b, e, _ in group)
            x = torch.zeros(len(group), width, dtype=torch.long)
            for row, (b, e, _) in enumerate(group):
                x[row, : e - b] = ids[b:e]
            logits = model(x.to(device)).float() / temperature
            logp = torch.log_softmax(logits, dim=-1).cpu()
            for row, (b, e, first) in enumerate(group):
                pos = torch.arange(first - b, e - b)  # window positions to score
                target = ids[first + 1 : e + 1]
                lp = logp[row, pos]
                loss[first:e] = (-lp.gather(1, target[:, None])[:, 0]).numpy()
                top = lp.max(dim=1)
                conf[first:e] = top.values.exp().numpy()
                correct[first:e] = (top.indices == target).numpy()
                ctx[first:e] = (pos + 1).numpy()
    return TokenScores(loss, conf, correct, ctx)


# ------------------------------------------------------ log-likelihood requests


def split_request(tokenizer, context: str, continuation: str) -> tuple[list, list]:
    """Token ids of a ``(context, continuation)`` pair, as lm-evaluation-harness does.

    Trailing whitespace of the context moves to the start of the continuation, the
    whole string is encoded once, and the continuation is what follows the
    context's own tokens, so the split never cuts a word the tokenizer would merge.
    An empty context becomes ``<|endoftext|>``; the string ``<|endoftext|>`` in a
    request is that token, as Hugging Face tokenizers (and so the harness) read it.
    """
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    if not context:
        eot = tokenizer.special_tokens["<|endoftext|>"]
        return [eot], encode_text(tokenizer, continuation)
    whole = encode_text(tokenizer, context + continuation)
    n_ctx = len(encode_text(tokenizer, context))
    return whole[:n_ctx], whole[n_ctx:]


@torch.no_grad()
def loglikelihood(
    model: nn.Module,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 32,
    context_length: int | None = None,
) -> list[tuple[float, bool]]:
    """Per ``(context, continuation)``: the summed log-probability (nats) of the
    continuation's tokens given the context, and whether greedy decoding would
    produce exactly those tokens (lm-evaluation-harness's ``loglikelihood``).

    A pair longer than the context window keeps its last ``context_length + 1``
    tokens (the context is cut from the left), as the harness does.
    """
    T = context_length_of(model, context_length)
    device = next(model.parameters()).device
    encoded = []
    for context, continuation in requests:
        ctx, cont = split_request(tokenizer, context, continuation)
        if not cont:
            raise ValueError(f"empty continuation for context {context[-40:]!r}")
        if len(cont) > T:
            raise ValueError(f"continuation of {len(cont)} tokens exceeds window {T}")
        encoded.append(((ctx + cont)[-(T + 1) :][:-1], cont))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(encoded)
    with evaluating(model):
        for i in range(0, len(order), batch_size):
            group = order[i : i + batch_size]
            width = max(len(encoded[j][0]) for j in group)
            x = torch.zeros(len(group), width, dtype=torch.long)
            for row, j in enumerate(group):
                x[row, : len(encoded[j][0])] = torch.tensor(encoded[j][0])
            logp = torch.log_softmax(model(x.to(device)).float(), dim=-1).cpu()
            for row, j in enumerate(group):
                inp, cont = encoded[j]
                lp = logp[row, len(inp) - len(cont) : len(inp)]
                target = torch.tensor(cont)
                total = lp.gather(1, target[:, None]).sum().item()
                out[j] = (total, bool((lp.argmax(dim=1) == target).all()))
    return out
