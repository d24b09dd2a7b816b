"""The tokenizer file format: readable JSON, GPT-2's printable bytes, clear errors."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

from shared.data import atomic_write

FORMAT_BPE = "llm-course-bpe-tokenizer"
FORMAT_CHAR = "llm-course-char-tokenizer"
FORMAT_VERSION = 1


class TokenizerFileError(ValueError):
    """A tokenizer file is damaged, foreign, or from an unknown format version."""


# GPT-2's byte <-> printable-character table (as in its merges.txt), so a saved
# tokenizer shows " the" as "Ġthe" and "\n" as "Ċ" instead of escape codes.


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable character."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars), strict=True))


def readable(token: bytes) -> str:
    """Show a token's bytes as GPT-2's merges.txt does (space -> Ġ, newline -> Ċ)."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


@lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def from_readable(text: str) -> bytes:
    """Invert :func:`readable`."""
    inverse = _unicode_to_bytes()
    try:
        return bytes(inverse[c] for c in text)
    except KeyError as err:
        raise ValueError(f"{text!r} is not a readable byte string") from err


def write_text(path: Path, text: str) -> None:
    """Write UTF-8 text atomically: a crash never leaves half a tokenizer file."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def read_json(path: str | os.PathLike, fmt: str) -> dict:
    """Read a tokenizer file of format ``fmt``; foreign or damaged files raise."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerFileError(
            f"{path} is not a tokenizer file (not valid UTF-8 JSON: {err})"
        ) from err
    if not isinstance(data, dict) or data.get("format") != fmt:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise TokenizerFileError(f"{path} is not a {fmt!r} file (format: {found!r})")
    if data.get("version") != FORMAT_VERSION:
        raise TokenizerFileError(
            f"{path} has format version {data.get('version')!r}; this code reads "
            f"version {FORMAT_VERSION}"
        )
    return data
