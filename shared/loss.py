"""The language-modelling loss on data, and its units: mean loss on random batches
(``estimate_loss``, what training logs) or on a whole split (``evaluate_split``),
perplexity, bits per character and per byte (comparable across tokenizers)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from shared.dataset import BatchSampler
from shared.model import evaluating
from shared.precision import autocast


def context_length_of(model: nn.Module, context_length: int | None = None) -> int:
    """``context_length`` if given, else the model's ``config.context_length``."""
    if context_length is not None:
        return context_length
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "context_length"):
        raise ValueError("pass context_length: the model has no config.context_length")
    return int(cfg.context_length)


@torch.no_grad()
def estimate_loss(
    model: nn.Module,
    splits: dict[str, object],
    *,
    eval_iters: int,
    batch_size: int,
    context_length: int | None = None,
    seed: int = 0,
    dtype: str = "float32",
) -> dict[str, float]:
    """Mean loss (nats/token) per split over ``eval_iters`` random batches.

    A fresh generator with a fixed seed draws the same batches at every evaluation,
    so successive points on the curve differ only because the model changed.
    """
    T = context_length_of(model, context_length)
    device = next(model.parameters()).device
    with evaluating(model):
        out = {}
        for name, data in splits.items():
            sampler = BatchSampler(data, batch_size, T, seed=seed)
            losses = []
            for _ in range(eval_iters):
                x, y = sampler.next()
                with autocast(device, dtype):
                    _, loss = model(x.to(device), y.to(device))
                losses.append(loss.float().item())
            out[name] = float(np.mean(losses))
    return out


@torch.no_grad()
def evaluate_split(
    model: nn.Module,
    data,
    *,
    context_length: int | None = None,
    batch_size: int = 32,
    max_tokens: int | None = None,
) -> float:
    """Mean loss (nats/token) over a whole split, in non-overlapping windows.

    Every token (but the first) is predicted exactly once; deterministic, unlike
    ``estimate_loss``. ``max_tokens`` evaluates only a prefix (fast checks).
    """
    T = context_length_of(model, context_length)
    device = next(model.parameters()).device
    ids = torch.as_tensor(np.asarray(data, dtype=np.int64))
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    n_win = (len(ids) - 1) // T
    if n_win == 0:
        raise ValueError(f"split of {len(ids)} tokens is shorter than one window ({T})")
    with evaluating(model):
        total, count = 0.0, 0
        x_all = ids[: n_win * T].view(n_win, T)
        y_all = ids[1 : n_win * T + 1].view(n_win, T)
        for i in range(0, n_win, batch_size):
            x, y = (
                x_all[i : i + batch_size].to(device),
                y_all[i : i + batch_size].to(device),
            )
            _, loss = model(x, y)
            total += loss.item() * y.numel()
            count += y.numel()
    return total / count


def bits_per_char(nats_per_token: float, n_tokens: int, n_chars: int) -> float:
    """Convert a per-token loss to bits per character, comparable across tokenizers."""
    return nats_per_token * n_tokens / n_chars / math.log(2)


def perplexity(nats_per_token: float) -> float:
    """``exp(loss)``: how many equally likely tokens the model is choosing among."""
    return math.exp(nats_per_token)


def bits_per_byte(nats_per_token: float, n_tokens: int, n_bytes: int) -> float:
    """A per-token loss as bits per UTF-8 byte of the text (the Pile's convention)."""
    return nats_per_token * n_tokens / n_bytes / math.log(2)
