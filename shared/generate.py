"""Text generation: greedy, temperature, top-k and top-p (nucleus) sampling.

``generate`` asks the model for the next-token logits, filters and samples them, and
appends the token, until ``max_new_tokens`` or every sequence has emitted ``eos_id``.
``KVCache`` keeps every layer's keys and values so each step runs only the new token
(``use_cache=True``, the default); ``iter_tokens`` yields tokens as they come.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from shared.model import position_ids_from_mask


class LayerCache:
    """One layer's view of a ``KVCache``: stores new keys/values, returns all so far."""

    def __init__(self, cache: KVCache, layer: int) -> None:
        self.cache, self.layer = cache, layer

    def update(
        self, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(self.layer, k, v)


class KVCache:
    """Keys and values of every layer, pre-allocated for ``max_len`` positions.

    Generation runs the prompt through the model once (*prefill*), then one token
    at a time (*decode*): each step computes the new token's query, key and value
    only, writes key and value after the cached ones, and attends to all of them.
    The tensors (n_layer, B, n_head, max_len, head_dim) are allocated on the first
    write, with the keys' batch size, dtype and device; writing is a copy into a
    slice, not a concatenation that reallocates everything at every step.
    """

    def __init__(self, n_layer: int, max_len: int) -> None:
        self.n_layer, self.max_len, self.length = n_layer, max_len, 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self, i)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` (B, n_head, T, head_dim) at the next T positions of
        ``layer``; return that layer's keys and values up to and including them."""
        b, h, t, d = k.shape
        if self.k is None:
            shape = (self.n_layer, b, h, self.max_len, d)
            self.k = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(shape, dtype=v.dtype, device=v.device)
        end = self.length + t
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} needed")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, t: int) -> None:
        """Count ``t`` more cached positions (the model calls it after all layers)."""
        self.length += t

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values."""
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()

    @staticmethod
    def bytes_per_token(config, batch_size: int = 1, bytes_per_value: int = 4) -> int:
        """Cache bytes one position costs: keys and values, every layer and head."""
        return 2 * config.n_layer * config.n_embd * batch_size * bytes_per_value


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
    model.eval()
    context = model.config.context_length
    # the cache holds the window; past it, positions would run out (learned) or
    # leave the trained range (RoPE), so generation goes on by recomputing the
    # last ``context`` tokens at each step, exactly as without a cache
    cache = None
    if use_cache and max_new_tokens > 0 and idx.size(1) < context:
        cache = KVCache(model.config.n_layer, context)
    try:
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if cache is not None and cache.length < context:
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
