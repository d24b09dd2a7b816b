"""The KV cache: every layer's keys and values, kept so each decoding step runs only
the new token (``iter_tokens(use_cache=True)``, the default)."""

from __future__ import annotations

import torch


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
    The tensors (n_layer, B, n_kv_head, max_len, head_dim) are allocated on the first
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
        """Store ``k, v`` (B, n_kv_head, T, head_dim) at the next T positions of
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

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (speculative decoding rolls back
        rejected tokens this way); the memory stays allocated."""
        if not 0 <= length <= self.length:
            raise ValueError(
                f"cannot truncate {self.length} cached positions to {length}"
            )
        self.length = length

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values."""
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()

    @staticmethod
    def bytes_per_token(config, batch_size: int = 1, bytes_per_value: int = 4) -> int:
        """Cache bytes one position costs: keys and values, every layer and key/value
        head: 2 x n_layer x n_kv_head x head_dim x batch x bytes per value."""
        n_kv_head = getattr(config, "n_kv_head", None) or config.n_head
        head_dim = config.n_embd // config.n_head
        return 2 * config.n_layer * n_kv_head * head_dim * batch_size * bytes_per_value
