"""Generation, in layers: the KV cache (``cache``), sampling a token from logits
(``sampling``), the token loop (``loop``: ``iter_tokens``, ``generate``) and the text
layer (``text``: ``complete``, ``stream``, stop sequences). Everything public is
importable from here: ``from shared.generation import generate``."""

from shared.generation.cache import KVCache, LayerCache
from shared.generation.loop import generate, iter_tokens
from shared.generation.sampling import (
    SettingError,
    check_settings,
    next_token_distribution,
    sample_next_token,
    top_k_filter,
    top_p_filter,
)
from shared.generation.text import (
    ENDOFTEXT,
    Completion,
    complete,
    encode_prompt,
    stream,
    stream_completion,
    unescape,
)

__all__ = [
    "Completion",
    "ENDOFTEXT",
    "KVCache",
    "LayerCache",
    "SettingError",
    "check_settings",
    "complete",
    "encode_prompt",
    "generate",
    "iter_tokens",
    "next_token_distribution",
    "sample_next_token",
    "stream",
    "stream_completion",
    "top_k_filter",
    "top_p_filter",
    "unescape",
]
