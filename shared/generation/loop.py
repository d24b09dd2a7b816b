"""The token loop: ``iter_tokens`` yields each new token as it is sampled and
``generate`` collects them; both run the prompt once and then one token per step
through the ``KVCache`` (or recompute the window with ``use_cache=False``)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from shared.attention import position_ids_from_mask
from shared.generation.cache import KVCache
from shared.generation.sampling import sample_next_token


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


def _cached_logits(
    model: nn.Module,
    idx: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: KVCache,
) -> torch.Tensor:
    """Logits (B, V) after ``idx``, running only the tokens the cache lacks."""
    new = idx[:, cache.length :]  # the whole prompt first (prefill), then one token
    if attention_mask is None:
        return model(new, kv_cache=cache)[:, -1, :]
    positions = position_ids_from_mask(attention_mask)[:, cache.length :]
    logits = model(
        new, attention_mask=attention_mask, position_ids=positions, kv_cache=cache
    )
    return logits[:, -1, :]


@torch.no_grad()
def iter_tokens(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield each new token (B, 1) as soon as it is sampled (streaming).

    The arguments are ``generate``'s. With ``eos_id`` a finished row keeps yielding
    ``eos_id`` until every row is done, then the iterator stops. The model is in eval
    mode while the iterator runs and back in its previous mode when it ends.
    """
    if idx.dim() == 1:
        raise ValueError("idx must be (batch, time); use idx[None] for one sequence")
    if idx.size(1) == 0:
        raise ValueError(
            "the prompt is empty: give at least one token to continue from, e.g. "
            "the tokenizer's <|endoftext|> id to start a new text"
        )
    was_training = model.training
    context = model.config.context_length
    # the cache holds the window; past it, positions would run out (learned) or
    # leave the trained range (RoPE), so generation goes on by recomputing the
    # last ``context`` tokens at each step, exactly as without a cache
    cache = None
    if use_cache and max_new_tokens > 0 and idx.size(1) < context:
        # room for the prompt and the new tokens (the last one is never fed back)
        cache = KVCache(
            model.config.n_layer, min(context, idx.size(1) + max_new_tokens)
        )
    model.eval()
    try:  # an exception or an early close restores the mode too
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if cache is not None and cache.length < cache.max_len:
                logits = _cached_logits(model, idx, attention_mask, cache)
            else:
                logits = _next_token_logits(model, idx, attention_mask)
            token = sample_next_token(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                token = token.masked_fill(done[:, None], eos_id)
                done |= token[:, 0] == eos_id
            idx = torch.cat([idx, token], dim=1)
            if attention_mask is not None:
                ones = torch.ones_like(token, dtype=attention_mask.dtype)
                attention_mask = torch.cat([attention_mask, ones], dim=1)
            yield token
            if eos_id is not None and bool(done.all()):
                break
    finally:
        model.train(was_training)


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
    use_cache: bool = True,
) -> torch.Tensor:
    """Extend ``idx`` (B, T) by up to ``max_new_tokens`` tokens; returns (B, T + n).

    ``temperature=0`` is greedy decoding. With ``eos_id`` a sequence stops after
    emitting it; in a batch, finished rows are padded with ``eos_id`` until all are
    done. Prompts of different lengths go in one batch left-padded, with
    ``attention_mask`` (B, T) marking real tokens 1 and padding 0. The model runs in
    eval mode (no dropout) and its previous mode is restored afterwards.
    ``use_cache`` keeps keys and values in a ``KVCache`` (same tokens, faster);
    ``False`` recomputes the whole window at every step.
    """
    new = list(
        iter_tokens(
            model, idx, max_new_tokens, temperature, top_k, top_p, eos_id,
            generator, attention_mask, use_cache,
        )
    )  # fmt: skip
    return torch.cat([idx, *new], dim=1)


# ------------------------------------------------------------ text in, text out
