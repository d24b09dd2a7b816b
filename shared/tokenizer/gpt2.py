"""GPT-2's tokenizer in our BPE: its merges recovered from tiktoken's ranks.

tiktoken stores GPT-2's vocabulary as ranks (token bytes -> id) without the merge
pairs; the pair that formed each token is recovered by running BPE on the token with
only the ranks below its own.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from functools import lru_cache
from typing import TYPE_CHECKING

from shared.data import DataUnavailableError
from shared.tokenizer.bpe import BPETokenizer
from shared.tokenizer.pretokenize import ENDOFTEXT

if TYPE_CHECKING:
    import tiktoken

# what tiktoken downloads for "gpt2" (tiktoken_ext/openai_public.py)
_GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
GPT2_FILES = {name: _GPT2_URL + name for name in ("vocab.bpe", "encoder.json")}


def _tiktoken_cache_dir() -> str:
    """Where tiktoken caches downloads (the logic of tiktoken/load.py)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _offline_message(err: Exception) -> str:
    cache = _tiktoken_cache_dir()
    lines = []
    for name, url in GPT2_FILES.items():
        # tiktoken names each cached file by the SHA-1 of its URL
        path = os.path.join(cache, hashlib.sha1(url.encode()).hexdigest())
        state = "present" if cache and os.path.exists(path) else "missing"
        lines.append(f"  - {name}: {state} as {path}\n    (from {url})")
    where = f"in {cache}" if cache else "nowhere (TIKTOKEN_CACHE_DIR is empty)"
    return (
        f"tiktoken cannot load GPT-2's tokenizer files ({type(err).__name__}: {err}).\n"
        f"It looked for them {where}:\n" + "\n".join(lines) + "\n"
        "Set TIKTOKEN_CACHE_DIR to a folder that holds these files (named by the "
        "SHA-1 of their URL, as above), or go online once so tiktoken downloads them."
    )


def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's ``gpt2`` encoding; offline without its files, one clear error."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    # a failed download (requests' errors are OSErrors) or a damaged file (ValueError)
    except (OSError, ValueError) as err:
        raise DataUnavailableError(_offline_message(err)) from err


def _bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Run tiktoken's rank-based BPE on ``token`` with only ranks below ``max_rank``."""
    parts = [bytes([b]) for b in token]
    while True:
        best_i, best_rank = None, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank:
                if best_rank is None or rank < best_rank:
                    best_i, best_rank = i, rank
        if best_i is None:
            return parts
        parts = (
            parts[:best_i] + [parts[best_i] + parts[best_i + 1]] + parts[best_i + 2 :]
        )


@lru_cache(maxsize=1)
def _gpt2_merges() -> tuple[tuple[int, int], ...]:
    ranks: dict[bytes, int] = gpt2_encoding()._mergeable_ranks
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    merges = []
    for token, rank in by_rank[256:]:
        # the two parts BPE had just before it formed this token name its merge
        left, right = _bpe_split(ranks, token, max_rank=rank)
        merges.append((ranks[left], ranks[right]))
    return tuple(merges)


def gpt2_tokenizer() -> BPETokenizer:
    """Our BPE loaded with GPT-2's merges: ids identical to tiktoken's ``gpt2``."""
    enc = gpt2_encoding()
    byte_order = [0] * 256
    for token, rank in enc._mergeable_ranks.items():
        if len(token) == 1:
            byte_order[rank] = token[0]
    return BPETokenizer(
        _gpt2_merges(),
        special_tokens={ENDOFTEXT: enc.eot_token},
        pattern=enc._pat_str,
        byte_order=byte_order,
    )
