"""Text generation: greedy, temperature, top-k and top-p (nucleus) sampling.

``generate`` asks the model for the next-token logits, filters and samples them, and
appends the token, until ``max_new_tokens`` or every sequence has emitted ``eos_id``.
Getting logits is one small function (``_next_token_logits``) so a KV cache can replace
it later without changing any caller.
"""

from __future__ import annotations

import torch
from torch import nn

from shared.model import position_ids_from_mask


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits per row, set the rest to -inf (ties kept)."""
    if k <= 0:
        raise ValueError(f"top_k must be positive, got {k}")
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the fewest most likely tokens whose probabilities sum to >= ``p``."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p == 1.0:  # the whole distribution; cumsum rounding must not drop the tail
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    # drop a token when those before it already reach p; the first always stays
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def next_token_distribution(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Probabilities (B, V) that sampling uses: temperature, then top-k, then top-p."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:  # greedy: all mass on the argmax
        return torch.zeros_like(logits).scatter(
            -1, logits.argmax(-1, keepdim=True), 1.0
        )
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return torch.softmax(logits, dim=-1)


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row (B, 1) from last-position logits (B, V)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = next_token_distribution(logits, temperature, top_k, top_p)
    if generator is not None and generator.device != probs.device:
        # a CPU generator keeps samples reproducible across devices
        return torch.multinomial(probs.cpu(), 1, generator=generator).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator)


def _next_token_logits(
    model: nn.Module, idx: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits (B, V) for the position after ``idx``, cropped to the model's context.

    With a (B, T) ``attention_mask`` (0 = left padding) padding is not attended to and
    positions count from each row's first real token.
    """
    context = model.config.context_length
    idx = idx[:, -context:]  # forget tokens that fell out of the window
    if attention_mask is None:
        return model(idx)[:, -1, :]
    mask = attention_mask[:, -context:]
    logits = model(idx, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    return logits[:, -1, :]


@torch.no_grad()
def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Extend ``idx`` (B, T) by up to ``max_new_tokens`` tokens; returns (B, T + n).

    ``temperature=0`` is greedy decoding. With ``eos_id`` a sequence stops after
    emitting it; in a batch, finished rows are padded with ``eos_id`` until all are
    done. Prompts of different lengths go in one batch left-padded, with
    ``attention_mask`` (B, T) marking real tokens 1 and padding 0. The model runs in
    eval mode (no dropout) and its previous mode is restored afterwards.
    """
    if idx.dim() == 1:
        raise ValueError("idx must be (batch, time); use idx[None] for one sequence")
    if idx.size(1) == 0:
        raise ValueError(
            "the prompt is empty: give at least one token to continue from, e.g. "
            "the tokenizer's <|endoftext|> id to start a new text"
        )
    was_training = model.training
    model.eval()
    try:
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            logits = _next_token_logits(model, idx, attention_mask)
            token = sample_next_token(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                token = token.masked_fill(done[:, None], eos_id)
                done |= token[:, 0] == eos_id
            idx = torch.cat([idx, token], dim=1)
            if attention_mask is not None:
                attention_mask = torch.cat(
                    [
                        attention_mask,
                        torch.ones_like(token, dtype=attention_mask.dtype),
                    ],
                    1,
                )
            if eos_id is not None and bool(done.all()):
                break
    finally:
        model.train(was_training)
    return idx
