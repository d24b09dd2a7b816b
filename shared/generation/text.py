"""Text in, text out: ``complete`` returns a prompt's continuation as a string and
``stream`` yields it in pieces as the tokens arrive, both ending at <|endoftext|> or a
stop sequence (neither shown). The command line and the server use these."""

from __future__ import annotations

import codecs
import re
from collections.abc import Generator, Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass

import torch
from torch import nn

from shared.generation.loop import iter_tokens
from shared.generation.sampling import check_settings

ENDOFTEXT = "<|endoftext|>"


@dataclass
class Completion:
    """One finished completion: its text, why it ended, and its token counts."""

    text: str
    finish_reason: str  # "stop": <|endoftext|> or a stop sequence; "length": the limit
    prompt_tokens: int
    completion_tokens: int  # tokens sampled, a final <|endoftext|> included


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The prompt's ids (special tokens allowed); "" starts a new text."""
    ids = tokenizer.encode(prompt, allowed_special="all")
    return ids or [tokenizer.special_tokens[ENDOFTEXT]]


def _sampled_ids(
    model: nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    eos_id: int | None,
) -> Iterator[int]:
    """Each new token id as it is sampled (the prompt is cropped to the window)."""
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    # a CPU generator: the same seed gives the same text on every device
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    tokens = iter_tokens(
        model, idx, max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, eos_id=eos_id, generator=generator,
    )  # fmt: skip
    with closing(tokens):  # stopping early ends iter_tokens now, not when collected
        for token in tokens:
            yield int(token[0, 0])


def _complete_prefix(data: bytes) -> str:
    """``data`` decoded but for an unfinished character at the end (more may come)."""
    return codecs.utf_8_decode(data, "replace", False)[0]


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop sequence in ``text`` starts, or None."""
    return min((i for i in map(text.find, stops) if i >= 0), default=None)


def _stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that a stop sequence begins with."""
    longest = max(map(len, stops), default=1) - 1  # a whole stop is found, not held
    for n in range(min(longest, len(text)), 0, -1):
        if any(stop.startswith(text[-n:]) for stop in stops):
            return n
    return 0


def _complete_text(
    tokenizer, tokens: Iterable[int], eos_id: int | None, stops: Sequence[str]
) -> str:
    """The text of ``tokens`` up to <|endoftext|> or the first stop sequence."""
    data = b""
    for token in tokens:
        if token == eos_id:
            break
        data += tokenizer.decode_bytes([token])
        text = _complete_prefix(data)
        cut = _find_stop(text, stops)  # after every token: a stop ends generation
        if cut is not None:
            return text[:cut]
    text = data.decode("utf-8", "replace")  # as tokenizer.decode does
    cut = _find_stop(text, stops)
    return text if cut is None else text[:cut]


def _text_pieces(
    tokenizer,
    tokens: Iterable[int],
    eos_id: int | None,
    stops: Sequence[str],
    prompt_tokens: int = 0,
) -> Generator[str, None, Completion]:
    """Yield ``_complete_text``'s text in pieces as soon as each piece is final.

    Held back until the next token: an unfinished UTF-8 character at the end (BPE
    tokens are bytes, one character may span two tokens) and an end that a stop
    sequence begins with (the stop may be completed, and it must not be shown).
    """
    data, sent, count, reason = b"", 0, 0, "length"  # sent: characters yielded
    for token in tokens:
        count += 1
        if token == eos_id:
            reason = "stop"
            break
        data += tokenizer.decode_bytes([token])
        text = _complete_prefix(data)
        cut = _find_stop(text, stops)
        if cut is not None:  # cut >= sent: the text after `sent` was held back
            if cut > sent:
                yield text[sent:cut]
            return Completion(text[:cut], "stop", prompt_tokens, count)
        final = len(text) - _stop_prefix_length(text, stops)
        if final > sent:
            yield text[sent:final]
            sent = final
    text = data.decode("utf-8", "replace")
    cut = _find_stop(text, stops)
    if cut is not None:
        text, reason = text[:cut], "stop"
    if len(text) > sent:
        yield text[sent:]
    return Completion(text, reason, prompt_tokens, count)


def complete(
    model: nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] = (),
) -> str:
    """The text generated after ``prompt`` (not the prompt itself).

    It ends at <|endoftext|> or before the first ``stop`` sequence (neither is
    included), else after ``max_new_tokens`` tokens; ``temperature=0`` is greedy and
    ``seed`` makes sampling reproducible. A prompt longer than the model's context
    keeps its last tokens; special tokens in it are allowed.
    """
    stops = check_settings(max_new_tokens, temperature, top_k, top_p, seed, stop)
    eos_id = tokenizer.special_tokens.get(ENDOFTEXT)
    ids = encode_prompt(tokenizer, prompt)
    sampled = _sampled_ids(
        model, ids, max_new_tokens, temperature, top_k, top_p, seed, eos_id
    )
    with closing(sampled):
        return _complete_text(tokenizer, sampled, eos_id, stops)


def stream_completion(
    model: nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] = (),
) -> Generator[str, None, Completion]:
    """``stream`` whose return value (``StopIteration.value``) is the ``Completion``.

    The settings are checked now, not at the first ``next``.
    """
    stops = check_settings(max_new_tokens, temperature, top_k, top_p, seed, stop)
    eos_id = tokenizer.special_tokens.get(ENDOFTEXT)
    ids = encode_prompt(tokenizer, prompt)

    def pieces() -> Generator[str, None, Completion]:
        sampled = _sampled_ids(
            model, ids, max_new_tokens, temperature, top_k, top_p, seed, eos_id
        )
        with closing(sampled):
            text = _text_pieces(tokenizer, sampled, eos_id, stops, len(ids))
            return (yield from text)

    return pieces()


def stream(
    model: nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] = (),
) -> Iterator[str]:
    """``complete``'s text in pieces as the tokens arrive: they join to its text.

    Closing the iterator early (``break``) stops generating.
    """
    return stream_completion(
        model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, seed, stop
    )


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    r"""Turn the escapes \n, \t, \r and \\ that a shell passes on unchanged into
    the characters they stand for; any other backslash stays as it is."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m[1]], text)
