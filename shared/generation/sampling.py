"""From next-token logits to a token: greedy, temperature, top-k and top-p (nucleus)
sampling, and ``check_settings``, the one validation of sampling settings that the
text functions, the command line and the server share."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


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
    drop_sorted[..., 0] = False  # also for a p that rounds to 0 in float32 (1e-300)
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
    # the largest logit becomes 0 before dividing: with a tiny temperature (1e-38)
    # the others go to -inf instead of overflowing to nan, which is greedy's limit;
    # a temperature below float32's range divides as its smallest normal number
    logits = logits.float()
    logits = logits - logits.amax(dim=-1, keepdim=True)
    logits = logits / max(temperature, torch.finfo(torch.float32).tiny)
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


class SettingError(ValueError):
    """A sampling setting that cannot be used; ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _short(number: int) -> str:
    """An integer for an error message: 10**400 is not written out in full."""
    text = str(number)
    return text if len(text) <= 30 else f"{text[:12]}... ({len(text)} digits)"


def check_settings(
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] = (),
) -> tuple[str, ...]:
    """Raise ``SettingError`` (a ``ValueError``) for settings sampling cannot use;
    returns the stop sequences as a tuple. The command line and the server both
    check their settings here, so they accept and refuse the same values."""
    if max_new_tokens < 0:
        raise SettingError(
            "max_new_tokens",
            f"max_new_tokens must be >= 0, got {_short(max_new_tokens)}",
        )
    if not temperature >= 0:  # written so that NaN fails too
        message = f"temperature must be >= 0, got {temperature}"
        raise SettingError("temperature", message)
    if temperature == math.inf:  # not "uniform noise": a setting nobody means
        message = "temperature must be finite, got inf (0 is greedy, 1 the model's)"
        raise SettingError("temperature", message)
    if top_k is not None and top_k < 1:
        raise SettingError("top_k", f"top_k must be >= 1, got {_short(top_k)}")
    if top_p is not None and not 0 < top_p <= 1:
        raise SettingError("top_p", f"top_p must be in (0, 1], got {top_p}")
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise SettingError("seed", f"seed must fit in 64 bits, got {_short(seed)}")
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if "" in stops:
        raise SettingError("stop", "a stop sequence must not be empty")
    return stops
