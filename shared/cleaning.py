"""Cleaning a web-like corpus: Gopher-style quality filters, exact and MinHash dedup.

The filters follow the heuristics of DeepMind's Gopher paper (MassiveText), scaled
down for short documents; every rule returns a name, so a pipeline can report what
each rule removed.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class QualityRules:
    """Thresholds of the quality filters (Gopher's values, word counts scaled down)."""

    min_words: int = 20
    max_words: int = 100_000
    max_symbol_ratio: float = 0.1  # '#' and ellipses per word
    min_alpha_words: float = 0.8  # share of words with at least one letter
    min_stop_words: int = 2  # distinct English stop words present
    max_dup_line_fraction: float = 0.3  # share of lines that repeat an earlier line
    max_top_2gram_fraction: float = 0.2  # characters covered by the top word 2-gram
    max_top_3gram_fraction: float = 0.18


def top_ngram_fraction(words: Sequence[str], n: int) -> float:
    """Share of the characters of ``words`` covered by their most frequent n-gram."""
    if len(words) < n:
        return 0.0
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    gram, count = grams.most_common(1)[0]
    if count < 2:
        return 0.0
    return count * sum(map(len, gram)) / max(1, sum(map(len, words)))


def quality_failures(doc: str, rules: QualityRules = QualityRules()) -> list[str]:
    """Names of the quality rules ``doc`` breaks (empty list: keep it)."""
    words = _WORD.findall(doc)
    n = len(words)
    failed = []
    if n < rules.min_words:
        failed.append("too few words")
    if n > rules.max_words:
        failed.append("too many words")
    if n == 0:
        return failed
    symbols = sum(w.count("#") + w.count("...") + w.count("…") for w in words)
    if symbols / n > rules.max_symbol_ratio:
        failed.append("symbol-to-word ratio")
    if sum(any(c.isalpha() for c in w) for w in words) / n < rules.min_alpha_words:
        failed.append("too few alphabetic words")
    lowered = {w.lower().strip(".,;:!?\"'()") for w in words}
    if len(lowered & STOP_WORDS) < rules.min_stop_words:
        failed.append("too few stop words")
    lines = [line.strip() for line in doc.splitlines() if line.strip()]
    if lines and 1 - len(set(lines)) / len(lines) > rules.max_dup_line_fraction:
        failed.append("repeated lines")
    lower_words = [w.lower() for w in words]
    if (
        top_ngram_fraction(lower_words, 2) > rules.max_top_2gram_fraction
        or top_ngram_fraction(lower_words, 3) > rules.max_top_3gram_fraction
    ):
        failed.append("repeated n-grams")
    return failed


def normalize(doc: str) -> str:
    """Lower case, whitespace collapsed: what exact dedup compares."""
    return " ".join(doc.lower().split())


def exact_duplicates(docs: Sequence[str]) -> dict[int, int]:
    """``{index: index of its first copy}`` for documents equal after normalizing."""
    first: dict[str, int] = {}
    dups = {}
    for i, doc in enumerate(docs):
        digest = hashlib.sha256(normalize(doc).encode("utf-8")).hexdigest()
        if digest in first:
            dups[i] = first[digest]
        else:
            first[digest] = i
    return dups


# --- MinHash

_PRIME = (1 << 31) - 1  # hashes are taken mod this prime, so a*x + b fits in int64


def shingles(doc: str, k: int = 5) -> set[str]:
    """The set of word k-grams (shingles) of a normalized document."""
    words = normalize(doc).split()
    if len(words) < k:
        return {" ".join(words)}
    return {" ".join(words[i : i + k]) for i in range(len(words) - k + 1)}


def jaccard(a: set, b: set) -> float:
    """Exact Jaccard similarity |a & b| / |a | b|."""
    return len(a & b) / len(a | b) if a or b else 1.0


class MinHasher:
    """``num_perm`` random hash functions h(x) = (a x + b) mod p over shingle hashes."""

    def __init__(self, num_perm: int = 128, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        self.a = rng.integers(1, _PRIME, size=num_perm, dtype=np.int64)
        self.b = rng.integers(0, _PRIME, size=num_perm, dtype=np.int64)

    def signature(self, items: set[str]) -> np.ndarray:
        """The MinHash signature: for each hash function, the minimum over items."""
        x = np.array(
            [
                int.from_bytes(
                    hashlib.blake2b(s.encode(), digest_size=8).digest(), "big"
                )
                % _PRIME
                for s in items
            ],
            dtype=np.int64,
        )
        return ((self.a[:, None] * x[None, :] + self.b[:, None]) % _PRIME).min(axis=1)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """P(min-hashes agree) = Jaccard similarity, estimated over the hash functions."""
    return float(np.mean(sig_a == sig_b))


def near_duplicates(
    docs: Sequence[str],
    threshold: float = 0.5,
    num_perm: int = 128,
    bands: int = 32,
    k: int = 5,
    seed: int = 0,
) -> list[tuple[int, int, float]]:
    """Pairs ``(i, j, estimated Jaccard)`` with i < j above ``threshold``.

    Locality-sensitive hashing: signatures are cut into ``bands`` bands; documents that
    agree on a whole band become candidates (so not every pair is compared), and only
    candidates are scored.
    """
    if num_perm % bands:
        raise ValueError("num_perm must be a multiple of bands")
    hasher = MinHasher(num_perm, seed)
    sigs = [hasher.signature(shingles(d, k)) for d in docs]
    rows = num_perm // bands
    candidates: set[tuple[int, int]] = set()
    for band in range(bands):
        buckets: dict[bytes, list[int]] = {}
        for i, sig in enumerate(sigs):
            key = sig[band * rows : (band + 1) * rows].tobytes()
            buckets.setdefault(key, []).append(i)
        for members in buckets.values():
            candidates.update(
                (a, b) for x, a in enumerate(members) for b in members[x + 1 :]
            )
    pairs = []
    for i, j in sorted(candidates):
        sim = estimated_jaccard(sigs[i], sigs[j])
        if sim >= threshold:
            pairs.append((i, j, sim))
    return pairs


def minhash_dedup(docs: Sequence[str], **kwargs) -> dict[int, int]:
    """``{index: index it duplicates}``: keep the first of each near-duplicate group."""
    parent = list(range(len(docs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, _ in near_duplicates(docs, **kwargs):
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return {i: root(i) for i in range(len(docs)) if root(i) != i}
