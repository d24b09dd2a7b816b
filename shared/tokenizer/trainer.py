"""BPE training: the fast incremental-count trainer and the naive reference.

Both follow one rule: merge the most frequent adjacent pair inside pre-tokens, again
and again; a tie goes to the lexicographically greater pair of byte strings
``(bytes(a), bytes(b))``, so training is deterministic.

The fast trainer counts pairs once over the *unique* pre-tokens weighted by how often
they occur, and after each merge updates only the pre-tokens that contain the merged
pair; a heap with lazy deletion finds the best pair.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Sequence

import regex

from shared.tokenizer.pretokenize import GPT2_PATTERN, merge, special_pattern


def _desc_key(token: bytes) -> tuple[int, ...]:
    """A key that sorts byte strings in DESCENDING lexicographic order (for a min-heap).

    Negating each byte reverses the order of differing bytes; the trailing 1 makes a
    proper prefix (the smaller string) sort after its extensions.
    """
    return tuple(-c for c in token) + (1,)


def pretoken_counts(
    text: str, special_tokens: Sequence[str] = (), pattern: str = GPT2_PATTERN
) -> Counter[str]:
    """Count each pre-token; special tokens are cut out first (never merged)."""
    compiled = regex.compile(pattern)
    special_re = special_pattern(special_tokens)
    parts = special_re.split(text)[::2] if special_re else [text]
    counts: Counter[str] = Counter()
    for part in parts:
        counts.update(compiled.findall(part))
    return counts


def train_merges(word_counts: dict[str, int], n_merges: int) -> list[tuple[int, int]]:
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
        if pair_counts.get((a, b), 0) != -neg:
            continue  # stale entry
        new_id = len(vocab)
        merges.append((a, b))
        vocab.append(vocab[a] + vocab[b])
        keys.append(_desc_key(vocab[-1]))

        # the merge removes every (a, b), so its count drops to 0 and it is deleted
        changed: dict[tuple[int, int], int] = defaultdict(int)
        for wi in where.pop((a, b)):
            w = words[wi]
            new_w = merge(w, (a, b), new_id)
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
        chunks = [merge(ids, (a, b), 256 + k) for ids in chunks]
    return merges
