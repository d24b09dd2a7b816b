"""The rules BPE training and encoding share: GPT-2's pre-tokenization pattern,
special tokens cut out of the text first (and refused where not allowed), lone
surrogates made encodable, and ``merge``, the one step both apply to a pair."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import regex

# GPT-2's pre-tokenization pattern, exactly as tiktoken's ``gpt2`` encoding spells it:
# contractions, letters, numbers, other symbols (each optionally after one space),
# then whitespace runs that leave the last space to the following word.
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++"""
    r"""|\s++$|\s+(?!\S)|\s"""
)
ENDOFTEXT = "<|endoftext|>"


def merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace each non-overlapping ``pair`` (scanning left to right) by ``new_id``."""
    out = []
    i, n = 0, len(ids)
    a, b = pair
    while i < n:
        if i < n - 1 and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def special_pattern(specials: Iterable[str]) -> regex.Pattern | None:
    # longest first, so a special token that contains another one wins
    specials = sorted(specials, key=len, reverse=True)
    if not specials:
        return None
    return regex.compile("(" + "|".join(regex.escape(s) for s in specials) + ")")


def fix_surrogates(text: str) -> str:
    """Replace lone surrogates (not encodable as UTF-8) by U+FFFD, as tiktoken does."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def fix_surrogates_stream(chunks: Iterable[str]) -> Iterator[str]:
    """:func:`fix_surrogates` on a stream, keeping a pair split across chunks whole."""
    pending = ""
    for chunk in chunks:
        text, pending = pending + chunk, ""
        if text and "\ud800" <= text[-1] <= "\udbff":  # may pair with what follows
            text, pending = text[:-1], text[-1]
        yield fix_surrogates(text)
    if pending:
        yield fix_surrogates(pending)


def special_error(token: str, position: int) -> ValueError:
    return ValueError(
        f"text contains the special token {token!r} at position {position}. If it is "
        f"meant as a control token, pass allowed_special={{{token!r}}} (or 'all'); to "
        "encode it as plain text, pass disallowed_special=()."
    )


def refuse_specials(chunks: Iterable[str], disallowed: set[str]) -> Iterator[str]:
    """Pass chunks through; raise if a disallowed special token occurs, even split."""
    pattern = special_pattern(disallowed)
    keep = max(map(len, disallowed)) - 1  # enough to see a token cut at a boundary
    tail, offset = "", 0  # the last `keep` characters seen, and where they start
    for chunk in chunks:
        window = tail + chunk
        match = pattern.search(window)
        if match:
            raise special_error(match.group(), offset + match.start())
        tail = window[max(len(window) - keep, 0) :]
        offset += len(window) - len(tail)
        yield chunk
