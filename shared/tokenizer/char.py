"""The character-level baseline: one id per distinct character, like nanoGPT's."""

from __future__ import annotations

import hashlib
import json
import operator
import os
from collections.abc import Iterable
from pathlib import Path

from shared.tokenizer.files import (
    FORMAT_CHAR,
    FORMAT_VERSION,
    TokenizerFileError,
    read_json,
    write_text,
)


class CharTokenizer:
    """One id per distinct character of a text (sorted), like nanoGPT's char model."""

    def __init__(self, text: str) -> None:
        self.chars: list[str] = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        """Number of distinct characters."""
        return len(self.chars)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"

    def fingerprint(self) -> str:
        """A short hash of the vocabulary (for caches)."""
        return hashlib.sha256(json.dumps(self.chars).encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        """One id per character; characters outside the vocabulary raise ValueError."""
        try:
            return [self.stoi[c] for c in text]
        except KeyError as err:
            raise ValueError(
                f"character {err.args[0]!r} is not in this CharTokenizer's vocabulary "
                f"of {self.vocab_size} characters"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        """Characters for the ids; an id outside the vocabulary raises ValueError."""
        chars, out = self.chars, []
        for i in ids:
            # checked by hand: chars[-1] would silently decode -1 as the last character
            try:
                ok = 0 <= operator.index(i) < len(chars)
            except TypeError:
                ok = False
            if not ok:
                raise ValueError(
                    f"id {i!r} is not in this CharTokenizer's vocabulary: ids must be "
                    f"in 0..{len(chars) - 1}"
                )
            out.append(chars[i])
        return "".join(out)

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_json` to ``path`` (atomically: never half a file)."""
        path = Path(path)
        write_text(path, self.to_json())
        return path

    def to_json(self) -> str:
        """The vocabulary as readable JSON."""
        data = {"format": FORMAT_CHAR, "version": FORMAT_VERSION, "chars": self.chars}
        return json.dumps(data, ensure_ascii=False, indent=1) + "\n"

    @classmethod
    def load(cls, path: str | os.PathLike) -> CharTokenizer:
        """Load a file written by :meth:`save`."""
        data = read_json(path, FORMAT_CHAR)
        chars = data.get("chars")
        if not isinstance(chars, list) or not all(
            isinstance(c, str) and len(c) == 1 for c in chars
        ):
            raise TokenizerFileError(
                f"{path} is damaged: 'chars' must be 1-char strings"
            )
        return cls("".join(chars))
