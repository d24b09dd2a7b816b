"""Tokenizers: a character-level baseline and byte-level BPE (GPT-2 compatible).

``BPETokenizer`` is the byte-level BPE of GPT-2, built from scratch:

* text is split into pre-tokens by the GPT-2 regex (special tokens are split out first
  and never merged across), and each pre-token is encoded as UTF-8 bytes;
* training merges the most frequent adjacent pair inside pre-tokens, again and again;
  a tie goes to the lexicographically greater pair of byte strings
  ``(bytes(a), bytes(b))``, so training is deterministic;
* encoding applies the learned merges in the order they were learned (lowest rank
  first).

``gpt2_tokenizer()`` loads GPT-2's merges (recovered from tiktoken's ``gpt2`` ranks)
into the same class and reproduces tiktoken's ids exactly.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Literal

import regex

from shared.data import artefact_dir, atomic_write

# GPT-2's pre-tokenization pattern, exactly as tiktoken's ``gpt2`` encoding spells it:
# contractions, letters, numbers, other symbols (each optionally after one space),
# then whitespace runs that leave the last space to the following word.
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++"""
    r"""|\s++$|\s+(?!\S)|\s"""
)
ENDOFTEXT = "<|endoftext|>"

FORMAT_BPE = "llm-course-bpe-tokenizer"
FORMAT_CHAR = "llm-course-char-tokenizer"
FORMAT_VERSION = 1

class TokenizerFileError(ValueError):
    """A tokenizer file is damaged, foreign, or from an unknown format version."""


# --------------------------------------------------------------------------------------
# Readable bytes: GPT-2's byte <-> printable-character table (as in its merges.txt),
# so a saved tokenizer shows " the" as "Ġthe" and "\n" as "Ċ" instead of escape codes.


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


# --------------------------------------------------------------------------------------
# Helpers shared by training and encoding


def _merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
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


def _desc_key(token: bytes) -> tuple[int, ...]:
    """A key that sorts byte strings in DESCENDING lexicographic order (for a min-heap).

    Negating each byte reverses the order of differing bytes; the trailing 1 makes a
    proper prefix (the smaller string) sort after its extensions.
    """
    return tuple(-c for c in token) + (1,)


def _special_pattern(specials: Iterable[str]) -> regex.Pattern | None:
    # longest first, so a special token that contains another one wins
    specials = sorted(specials, key=len, reverse=True)
    if not specials:
        return None
    return regex.compile("(" + "|".join(regex.escape(s) for s in specials) + ")")


def _fix_surrogates(text: str) -> str:
    """Replace lone surrogates (not encodable as UTF-8) by U+FFFD, as tiktoken does."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


# --------------------------------------------------------------------------------------
# Byte-level BPE


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
        self._setup(merges, special_tokens, pattern, byte_order)

    def _setup(
        self,
        merges: Sequence[tuple[int, int]],
        special_tokens: dict[str, int] | Sequence[str],
        pattern: str,
        byte_order: Sequence[int] | None,
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
        self._special_re = _special_pattern(self.special_tokens)
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
        self,
        text: str,
        vocab_size: int,
        special_tokens: Sequence[str] = (),
        pattern: str = GPT2_PATTERN,
        verbose: bool = False,
    ) -> BPETokenizer:
        """Learn ``vocab_size - 256 - len(special_tokens)`` merges; returns ``self``.

        ``BPETokenizer().train(text, 1024)`` replaces any merges the tokenizer had.

        Fast trainer: pairs are counted once over the *unique* pre-tokens weighted by
        how often they occur, and after each merge only the pre-tokens that contain the
        merged pair are updated; a heap with lazy deletion finds the best pair.
        """
        n_merges = vocab_size - 256 - len(special_tokens)
        if n_merges < 0:
            raise ValueError(
                f"vocab_size={vocab_size} is smaller than 256 bytes + "
                f"{len(special_tokens)} special tokens"
            )
        counts = pretoken_counts(text, special_tokens, pattern)
        merges = train_merges(counts, n_merges, verbose=verbose)
        self._setup(merges, list(special_tokens), pattern, None)
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
            ids = _merge(ids, best, best_rank)
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
        for chunk in self._compiled.findall(_fix_surrogates(text)):
            out.extend(self._encode_chunk(chunk))
        return out

    def encode(
        self,
        text: str,
        allowed_special: Literal["all"] | Collection[str] = frozenset(),
        disallowed_special: Literal["all"] | Collection[str] = "all",
    ) -> list[int]:
        """Encode text to ids; special-token strings raise unless ``allowed_special``.

        As in tiktoken: a special token's string in ``allowed_special`` becomes its id;
        one in ``disallowed_special`` (default: every other special token) raises
        ``ValueError``; pass ``disallowed_special=()`` to encode them as plain text.
        """
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
        if disallowed:
            match = _special_pattern(disallowed).search(text)
            if match:
                raise ValueError(
                    f"text contains the special token {match.group()!r} at position "
                    f"{match.start()}. If it is meant as a control token, pass "
                    f"allowed_special={{{match.group()!r}}} (or 'all'); to encode it "
                    "as plain text, pass disallowed_special=()."
                )
        if not allowed:
            return self.encode_ordinary(text)
        out: list[int] = []
        for i, part in enumerate(_special_pattern(allowed).split(text)):
            if i % 2:  # split() with a group puts the separators at odd positions
                out.append(self.special_tokens[part])
            elif part:
                out.extend(self.encode_ordinary(part))
        return out

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
        """Write human-readable JSON: one merge per line, tokens shown as GPT-2 does."""
        path = Path(path)
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
        text = "{\n" + ",\n".join(fields) + ',\n  "merges": ' + merges + "\n}\n"
        _write_atomic(path, text)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        """Load a file written by :meth:`save`; damaged or foreign files raise."""
        data = _read_json(path, FORMAT_BPE)
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


# --------------------------------------------------------------------------------------
# The fast trainer


def pretoken_counts(
    text: str, special_tokens: Sequence[str] = (), pattern: str = GPT2_PATTERN
) -> Counter[str]:
    """Count each pre-token; special tokens are cut out first (never merged)."""
    compiled = regex.compile(pattern)
    special_re = _special_pattern(special_tokens)
    parts = special_re.split(text)[::2] if special_re else [text]
    counts: Counter[str] = Counter()
    for part in parts:
        counts.update(compiled.findall(part))
    return counts


def train_merges(
    word_counts: dict[str, int], n_merges: int, verbose: bool = False
) -> list[tuple[int, int]]:
    """Learn ``n_merges`` merges from pre-token counts with incremental pair counts."""
    words: list[list[int]] = [list(w.encode("utf-8")) for w in word_counts]
    freqs: list[int] = list(word_counts.values())
    vocab: list[bytes] = [bytes([i]) for i in range(256)]
    keys: list[tuple[int, ...]] = [_desc_key(t) for t in vocab]

    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> word indices
    for wi, (w, f) in enumerate(zip(words, freqs, strict=True)):
        for pair in zip(w, w[1:], strict=False):
            pair_counts[pair] += f
            where[pair].add(wi)

    # min-heap on (-count, descending bytes of left, of right): the top is the most
    # frequent pair, ties going to the greater pair of byte strings. Entries go stale
    # when counts change; a popped entry is used only if its count is still current.
    heap = [(-c, keys[a], keys[b], a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    while len(merges) < n_merges and heap:
        neg, _, _, a, b = heapq.heappop(heap)
        if pair_counts.get((a, b), 0) != -neg or neg == 0:
            continue  # stale entry
        new_id = len(vocab)
        merges.append((a, b))
        vocab.append(vocab[a] + vocab[b])
        keys.append(_desc_key(vocab[-1]))
        if verbose:
            print(f"merge {len(merges)}: {vocab[a]!r} + {vocab[b]!r} (count {-neg})")

        changed: dict[tuple[int, int], int] = defaultdict(int)
        for wi in where.pop((a, b)):
            w = words[wi]
            if len(w) < 2:
                continue
            new_w = _merge(w, (a, b), new_id)
            if len(new_w) == len(w):
                continue  # stale index entry: the pair left this word earlier
            f = freqs[wi]
            for pair in zip(w, w[1:], strict=False):
                changed[pair] -= f
            for pair in zip(new_w, new_w[1:], strict=False):
                changed[pair] += f
                where[pair].add(wi)
            words[wi] = new_w
        for pair, delta in changed.items():
            if delta == 0:
                continue
            count = pair_counts[pair] + delta
            if count > 0:
                pair_counts[pair] = count
                heapq.heappush(heap, (-count, keys[pair[0]], keys[pair[1]], *pair))
            else:
                del pair_counts[pair]
        pair_counts.pop((a, b), None)
    return merges


def naive_train(text: str, n_merges: int) -> list[tuple[bytes, bytes]]:
    """Reference trainer: recount every pair of every pre-token before each merge.

    Slow (minbpe-style) but obviously right; the tests and ``bench_bpe.py`` check the
    fast trainer against it. Same rule: most frequent pair, ties to the greater bytes.
    """
    chunks = [list(c.encode("utf-8")) for c in regex.findall(GPT2_PATTERN, text)]
    vocab = {i: bytes([i]) for i in range(256)}
    merges = []
    for k in range(n_merges):
        counts: dict[tuple[int, int], int] = {}
        for ids in chunks:
            for pair in zip(ids, ids[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        a, b = max(counts, key=lambda p: (counts[p], vocab[p[0]], vocab[p[1]]))
        vocab[256 + k] = vocab[a] + vocab[b]
        merges.append((vocab[a], vocab[b]))
        chunks = [_merge(ids, (a, b), 256 + k) for ids in chunks]
    return merges


# --------------------------------------------------------------------------------------
# GPT-2


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
    import tiktoken

    ranks: dict[bytes, int] = tiktoken.get_encoding("gpt2")._mergeable_ranks
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    if [r for _, r in by_rank] != list(range(len(by_rank))):
        raise RuntimeError("tiktoken's gpt2 ranks are not contiguous")
    merges = []
    for token, rank in by_rank[256:]:
        # the two parts BPE had just before it formed this token name its merge
        left, right = _bpe_split(ranks, token, max_rank=rank)
        merges.append((ranks[left], ranks[right]))
    return tuple(merges)


def gpt2_tokenizer() -> BPETokenizer:
    """Our BPE loaded with GPT-2's merges: ids identical to tiktoken's ``gpt2``."""
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    ranks = enc._mergeable_ranks
    byte_order = [0] * 256
    for token, rank in ranks.items():
        if len(token) == 1:
            byte_order[rank] = token[0]
    return BPETokenizer(
        _gpt2_merges(),
        special_tokens={ENDOFTEXT: enc.eot_token},
        pattern=enc._pat_str,
        byte_order=byte_order,
    )


# --------------------------------------------------------------------------------------
# The course's tokenizer


def course_training_text() -> str:
    """The training split of Tiny Shakespeare: its first 90% of characters."""
    from shared.data import read_text

    text = read_text("tinyshakespeare")
    return text[: int(0.9 * len(text))]


def course_tokenizer(vocab_size: int = 1024) -> BPETokenizer:
    """BPE trained on the training split of Tiny Shakespeare, cached under data/cache/.

    The last id is ``<|endoftext|>``; training is deterministic, so the cache only saves
    time.
    """
    text = course_training_text()
    key = hashlib.sha256(
        f"{FORMAT_VERSION}|{GPT2_PATTERN}|{vocab_size}|{ENDOFTEXT}|".encode()
        + text.encode("utf-8")
    ).hexdigest()[:12]
    path = artefact_dir() / "tokenizers" / f"tinyshakespeare-bpe{vocab_size}-{key}.json"
    if path.exists():
        try:
            return BPETokenizer.load(path)
        except TokenizerFileError:
            path.unlink()  # damaged cache: retrain
    tok = BPETokenizer().train(text, vocab_size, special_tokens=[ENDOFTEXT])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(path)
    return tok


# --------------------------------------------------------------------------------------
# Character-level baseline


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
        """Characters for the ids."""
        try:
            return "".join(self.chars[i] for i in ids)
        except (IndexError, TypeError):
            raise ValueError(f"ids must be in 0..{self.vocab_size - 1}") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the vocabulary as readable JSON."""
        path = Path(path)
        data = {"format": FORMAT_CHAR, "version": FORMAT_VERSION, "chars": self.chars}
        _write_atomic(path, json.dumps(data, ensure_ascii=False, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> CharTokenizer:
        """Load a file written by :meth:`save`."""
        data = _read_json(path, FORMAT_CHAR)
        chars = data.get("chars")
        if not isinstance(chars, list) or not all(
            isinstance(c, str) and len(c) == 1 for c in chars
        ):
            raise TokenizerFileError(
                f"{path} is damaged: 'chars' must be 1-char strings"
            )
        return cls("".join(chars))


# --------------------------------------------------------------------------------------
# Files


def _write_atomic(path: Path, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def _read_json(path: str | os.PathLike, fmt: str) -> dict:
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
