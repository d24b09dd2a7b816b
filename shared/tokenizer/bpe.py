"""Byte-level BPE, GPT-2 style: regex pre-tokens, safe special tokens, readable files.

* text is split into pre-tokens by the GPT-2 regex (special tokens are split out first
  and never merged across), and each pre-token is encoded as UTF-8 bytes;
* encoding applies the learned merges in the order they were learned (lowest rank
  first); ``encode_iterable`` does the same for a stream of text in bounded memory.

The rules training shares with encoding (pattern, special tokens, ``merge``) are in
``pretokenize.py``; training is in ``trainer.py`` (``BPETokenizer.train`` calls it).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import regex

from shared.tokenizer.files import (
    FORMAT_BPE,
    FORMAT_VERSION,
    TokenizerFileError,
    from_readable,
    read_json,
    readable,
    write_text,
)
from shared.tokenizer.pretokenize import (
    GPT2_PATTERN,
    fix_surrogates,
    fix_surrogates_stream,
    merge,
    refuse_specials,
    special_error,
    special_pattern,
)
from shared.tokenizer.trainer import pretoken_counts, train_merges

Specials = Literal["all"] | Collection[str]


class BPETokenizer:
    """Byte-level BPE with GPT-2 regex pre-tokenization and safe special tokens.

    Ids ``0..255`` are single bytes (``byte_order[i]`` is the byte of id ``i``; identity
    for tokenizers trained here, GPT-2's order for ``gpt2_tokenizer()``), ids
    ``256..256+len(merges)-1`` are merges in the order they were learned, special tokens
    come last.
    """

    def __init__(
        self,
        merges: Sequence[tuple[int, int]] = (),
        special_tokens: dict[str, int] | Sequence[str] = (),
        pattern: str = GPT2_PATTERN,
        byte_order: Sequence[int] | None = None,
    ) -> None:
        byte_order = list(range(256)) if byte_order is None else list(byte_order)
        if sorted(byte_order) != list(range(256)):
            raise ValueError("byte_order must be a permutation of 0..255")
        self.pattern = pattern
        self.byte_order = byte_order
        self._compiled = regex.compile(pattern)
        self._byte_to_id = [0] * 256
        for i, b in enumerate(byte_order):
            self._byte_to_id[b] = i
        self.vocab: dict[int, bytes] = {i: bytes([b]) for i, b in enumerate(byte_order)}
        self.merges: dict[tuple[int, int], int] = {}
        for a, b in merges:
            if a not in self.vocab or b not in self.vocab:
                raise ValueError(f"merge ({a}, {b}) uses an id not defined before it")
            new_id = 256 + len(self.merges)
            self.merges[(a, b)] = new_id
            self.vocab[new_id] = self.vocab[a] + self.vocab[b]
        if not isinstance(special_tokens, dict):
            first = 256 + len(self.merges)
            special_tokens = {s: first + i for i, s in enumerate(special_tokens)}
        for s, i in special_tokens.items():
            if i in self.vocab:
                raise ValueError(f"special token {s!r} reuses id {i}")
        self.special_tokens: dict[str, int] = dict(special_tokens)
        self.inverse_special = {i: s for s, i in self.special_tokens.items()}
        self._cache: dict[str, list[int]] = {}

    # --- properties

    @property
    def vocab_size(self) -> int:
        """Number of ids: 256 bytes + merges + special tokens."""
        return len(self.vocab) + len(self.special_tokens)

    def __repr__(self) -> str:
        return (
            f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
            f"special_tokens={list(self.special_tokens)})"
        )

    def fingerprint(self) -> str:
        """A short hash of everything that decides the ids (for caches)."""
        state = [self.pattern, self.byte_order, sorted(self.special_tokens.items())]
        state.append(sorted(self.merges.items(), key=lambda kv: kv[1]))
        return hashlib.sha256(json.dumps(state).encode()).hexdigest()[:16]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id stands for (a special token's UTF-8 string)."""
        if token_id in self.vocab:
            return self.vocab[token_id]
        if token_id in self.inverse_special:
            return self.inverse_special[token_id].encode("utf-8")
        raise ValueError(
            f"id {token_id} is not in the vocabulary (size {self.vocab_size})"
        )

    # --- training

    def train(
        self, text: str, vocab_size: int, special_tokens: Sequence[str] = ()
    ) -> BPETokenizer:
        """Learn ``vocab_size - 256 - len(special_tokens)`` merges; returns ``self``.

        ``BPETokenizer().train(text, 1024)`` replaces any merges the tokenizer had and
        keeps its pattern. The fast trainer is in ``shared/tokenizer/trainer.py``.
        """
        # imported here: the trainer imports merge from this module
        n_merges = vocab_size - 256 - len(special_tokens)
        if n_merges < 0:
            raise ValueError(
                f"vocab_size={vocab_size} is smaller than 256 bytes + "
                f"{len(special_tokens)} special tokens"
            )
        counts = pretoken_counts(text, special_tokens, self.pattern)
        merges = train_merges(counts, n_merges)
        self.__init__(merges, list(special_tokens), self.pattern)  # rebuild the ids
        return self

    # --- encoding

    def _encode_chunk(self, chunk: str) -> list[int]:
        cached = self._cache.get(chunk)
        if cached is not None:
            return cached
        to_id = self._byte_to_id
        ids = [to_id[b] for b in chunk.encode("utf-8", "surrogateescape")]
        merges = self.merges
        while len(ids) >= 2:
            # the pair learned earliest (lowest rank = lowest new id) is merged first
            best = None
            best_rank = None
            for pair in zip(ids, ids[1:], strict=False):
                rank = merges.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best, best_rank = pair, rank
            if best is None:
                break
            ids = merge(ids, best, best_rank)
        if len(self._cache) > 200_000:  # bound the memory of very long runs
            self._cache.clear()
        self._cache[chunk] = ids
        return ids

    def clear_cache(self) -> None:
        """Forget cached pre-token encodings (for timing cold encoding)."""
        self._cache.clear()

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text, treating special-token strings as ordinary text."""
        out: list[int] = []
        for chunk in self._compiled.findall(fix_surrogates(text)):
            out.extend(self._encode_chunk(chunk))
        return out

    def _special_sets(
        self, allowed_special: Specials, disallowed_special: Specials
    ) -> tuple[set[str], set[str]]:
        if allowed_special == "all":
            allowed = set(self.special_tokens)
        else:
            allowed = set(allowed_special)
            unknown = allowed - set(self.special_tokens)
            if unknown:
                raise ValueError(
                    f"not special tokens of this tokenizer: {sorted(unknown)}"
                )
        if disallowed_special == "all":
            disallowed = set(self.special_tokens) - allowed
        else:
            disallowed = set(disallowed_special)
        return allowed, disallowed

    def _encode_allowed(self, text: str, allowed: regex.Pattern | None) -> list[int]:
        """Encode text in which the ``allowed`` special tokens become their ids."""
        if allowed is None:
            return self.encode_ordinary(text)
        out: list[int] = []
        for i, part in enumerate(allowed.split(text)):
            if i % 2:  # split() with a group puts the separators at odd positions
                out.append(self.special_tokens[part])
            elif part:
                out.extend(self.encode_ordinary(part))
        return out

    def encode(
        self,
        text: str,
        allowed_special: Specials = frozenset(),
        disallowed_special: Specials = "all",
    ) -> list[int]:
        """Encode text to ids; special-token strings raise unless ``allowed_special``.

        As in tiktoken: a special token's string in ``allowed_special`` becomes its id;
        one in ``disallowed_special`` (default: every other special token) raises
        ``ValueError``; pass ``disallowed_special=()`` to encode them as plain text.
        """
        allowed, disallowed = self._special_sets(allowed_special, disallowed_special)
        if disallowed:
            match = special_pattern(disallowed).search(text)
            if match:
                raise special_error(match.group(), match.start())
        return self._encode_allowed(text, special_pattern(allowed))

    # Streaming: which ids are settled before the rest of the text is seen? The GPT-2
    # regex decides a pre-token by looking at most two characters past its end (a lone
    # "'" checks for "'ll", a whitespace run for the character after it, "\s++$" for
    # the end of the text). So when the text seen so far is split into pre-tokens, all
    # but the last two are final whatever follows: the last can still grow ("wor" +
    # "ld"), and the one before it can still change when the last is one character
    # ("we'l" splits as we|'|l, but "we'll" as we|'ll). Those two are carried into the
    # next buffer, and so is a suffix that may yet become an allowed special token
    # ("<|endof" + "text|>"). Special tokens end a piece of text: before one,
    # everything is settled.

    def encode_iterable(
        self,
        chunks: Iterable[str],
        allowed_special: Specials = frozenset(),
        disallowed_special: Specials = "all",
    ) -> Iterator[int]:
        """Encode a stream of text lazily: the ids of ``encode("".join(chunks))``.

        Memory is bounded by the few pre-tokens held back at a chunk's end, not by the
        length of the stream: pass an open file to encode it line by line. A disallowed
        special token raises ``ValueError`` when the stream reaches it.
        """
        if self.pattern != GPT2_PATTERN:
            raise ValueError("encode_iterable's boundary rule holds for GPT2_PATTERN")
        allowed, disallowed = self._special_sets(allowed_special, disallowed_special)
        if disallowed:
            chunks = refuse_specials(chunks, disallowed)
        allowed_re = special_pattern(allowed)
        prefixes = {s[:k] for s in allowed for k in range(1, len(s))}
        buffer, carried = "", 0  # text not yet encoded; its length after the last scan
        for chunk in fix_surrogates_stream(chunks):
            buffer += chunk
            if len(buffer) < 2 * carried:
                continue  # rescanning a long carry for every tiny chunk is quadratic
            ids, n = self._encode_settled(buffer, allowed_re, prefixes)
            yield from ids
            buffer = buffer[n:]
            carried = len(buffer)
        yield from self._encode_allowed(buffer, allowed_re)

    def _encode_settled(
        self, text: str, allowed: regex.Pattern | None, prefixes: set[str]
    ) -> tuple[list[int], int]:
        """Ids of the start of ``text`` that no continuation changes, and its length."""
        end = len(text)
        for k in range(min(max(map(len, prefixes), default=0), len(text)), 0, -1):
            if text[-k:] in prefixes:  # the longest suffix that may become a special
                end -= k
                break
        ids: list[int] = []
        start = 0
        if allowed is not None:
            # a match that starts before `end` is final: a longer special token at the
            # same place would make the text from there on one of the prefixes
            for match in allowed.finditer(text):
                if match.start() >= end:
                    break
                ids += self.encode_ordinary(text[start : match.start()])
                ids.append(self.special_tokens[match.group()])
                start = match.end()
        if start >= end:
            return ids, start
        pieces = self._compiled.findall(text[start:end])
        for piece in pieces[:-2]:
            ids += self._encode_chunk(piece)
        return ids, end - sum(map(len, pieces[-2:]))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Encode arbitrary bytes (not necessarily UTF-8), exactly reversible."""
        text = data.decode("utf-8", "surrogateescape")
        out: list[int] = []
        for chunk in self._compiled.findall(text):
            out.extend(self._encode_chunk(chunk))
        return out

    # --- decoding

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes the ids stand for (special tokens as their UTF-8 strings)."""
        vocab = self.vocab
        try:
            return b"".join(
                vocab[i] if i in vocab else self.inverse_special[i].encode("utf-8")
                for i in ids
            )
        except KeyError as err:
            raise ValueError(
                f"id {err.args[0]} is not in the vocabulary (size {self.vocab_size})"
            ) from None

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Decode ids to text; incomplete UTF-8 sequences become U+FFFD by default."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def tokens(self, ids: Iterable[int]) -> list[str]:
        """Each id as a (possibly partial) string, for displays."""
        return [self.token_bytes(i).decode("utf-8", errors="replace") for i in ids]

    # --- save / load

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_json` to ``path`` (atomically: never half a file)."""
        path = Path(path)
        write_text(path, self.to_json())
        return path

    def to_json(self) -> str:
        """Human-readable JSON: one merge per line, tokens shown as GPT-2 does."""
        seen = Counter(self.vocab.values())
        lines = []
        for (a, b), _ in sorted(self.merges.items(), key=lambda kv: kv[1]):
            entry: list = [readable(self.vocab[a]), readable(self.vocab[b])]
            if seen[self.vocab[a]] > 1 or seen[self.vocab[b]] > 1:
                entry += [a, b]  # two tokens share these bytes: name the ids too
            lines.append("    " + json.dumps(entry, ensure_ascii=False))
        header = {
            "format": FORMAT_BPE,
            "version": FORMAT_VERSION,
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "byte_order": None
            if self.byte_order == list(range(256))
            else self.byte_order,
        }
        fields = [
            f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}"
            for k, v in header.items()
        ]
        merges = "[\n" + ",\n".join(lines) + "\n  ]" if lines else "[]"
        return "{\n" + ",\n".join(fields) + ',\n  "merges": ' + merges + "\n}\n"

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        """Load a file written by :meth:`save`; damaged or foreign files raise."""
        data = read_json(path, FORMAT_BPE)
        try:
            byte_order = data["byte_order"] or list(range(256))
            by_bytes: dict[bytes, int] = {
                bytes([b]): i for i, b in enumerate(byte_order)
            }
            merges = []
            for n, entry in enumerate(data["merges"]):
                if not isinstance(entry, list) or len(entry) not in (2, 4):
                    raise ValueError(
                        f"merge {n} is not a [left, right] pair: {entry!r}"
                    )
                if len(entry) == 4:
                    a, b = int(entry[2]), int(entry[3])
                else:
                    left, right = from_readable(entry[0]), from_readable(entry[1])
                    a, b = by_bytes[left], by_bytes[right]
                merges.append((a, b))
                new = from_readable(entry[0]) + from_readable(entry[1])
                by_bytes.setdefault(new, 256 + n)
            return cls(
                merges,
                special_tokens={
                    str(k): int(v) for k, v in data["special_tokens"].items()
                },
                pattern=data["pattern"],
                byte_order=byte_order,
            )
        except (KeyError, TypeError, ValueError, IndexError, regex.error) as err:
            raise TokenizerFileError(
                f"{path} is damaged: {type(err).__name__}: {err} "
                f"(expected a file written by BPETokenizer.save)"
            ) from err
