"""Generation, in layers: the KV cache (``cache``), sampling a token from logits
(``sampling``), the token loop (``loop``: ``iter_tokens``, ``generate``), speculative
decoding with a draft model (``speculative``: ``speculative_generate``), continuous
batching of many requests (``batching``: ``Scheduler``) and the text
layer (``text``: ``complete``, ``stream``, stop sequences). Everything public is
importable from here: ``from shared.generation import generate``."""

from shared.generation.batching import (
    Request,
    Scheduler,
    SchedulerThread,
    SlotKVCache,
    TokenStream,
    stream_text,
)
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
from shared.generation.speculative import (
    SpeculativeStats,
    acceptance_probability,
    break_even_cost_ratio,
    expected_speedup,
    expected_tokens_per_pass,
    speculative_generate,
    verify_draft,
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
    "Request",
    "Scheduler",
    "SchedulerThread",
    "SettingError",
    "SlotKVCache",
    "SpeculativeStats",
    "TokenStream",
    "acceptance_probability",
    "break_even_cost_ratio",
    "check_settings",
    "complete",
    "encode_prompt",
    "expected_speedup",
    "expected_tokens_per_pass",
    "generate",
    "iter_tokens",
    "next_token_distribution",
    "sample_next_token",
    "speculative_generate",
    "stream",
    "stream_completion",
    "stream_text",
    "top_k_filter",
    "top_p_filter",
    "unescape",
    "verify_draft",
]
