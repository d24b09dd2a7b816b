"""Benchmark: BPE training and encoding speed, measured side by side in one run.

Training to vocab 1024 on all of Tiny Shakespeare:
  * fast   - ``shared.tokenizer`` (unique pre-tokens weighted by count, incremental pair
             counts, a heap with lazy deletion);
  * naive  - recounts every pair of every pre-token after every merge (what
             minbpe's RegexTokenizer does); slow, so by default it runs only the
             first ``--naive-merges`` merges and the full time is extrapolated from
             the time per merge (``--naive-merges 0`` runs all of them, once).
Both must learn the same merges (checked).

Encoding throughput (MB/s of UTF-8) on the whole corpus: our trained tokenizer, our
encoder with GPT-2's merges, and tiktoken's ``gpt2`` (Rust); cold chunk cache.

Run:  python chapters/01_tokenization/bench_bpe.py [--repeats 3] [--naive-merges 48]
(with BOOK_DATA_MIRROR / TIKTOKEN_CACHE_DIR set on offline machines).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import regex
import tiktoken

from shared.data import read_text
from shared.tokenizer import GPT2_PATTERN, BPETokenizer, gpt2_tokenizer, naive_train

VOCAB_SIZE = 1024


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--naive-merges", type=int, default=48, help="0 = all merges (slow)"
    )
    args = parser.parse_args()

    text = read_text("tinyshakespeare")
    n_bytes = len(text.encode("utf-8"))
    n_merges = VOCAB_SIZE - 256
    print(f"Tiny Shakespeare: {len(text):,} characters, {n_bytes:,} bytes")
    print(
        f"machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores (shared with other jobs: compare ratios, not seconds)"
    )
    print(f"medians of {args.repeats} repeats unless said otherwise\n")

    # --- training ------------------------------------------------------------------
    fast_s, fast_tok = timed(
        lambda: BPETokenizer().train(text, VOCAB_SIZE), args.repeats
    )
    fast_merges = [(fast_tok.vocab[a], fast_tok.vocab[b]) for a, b in fast_tok.merges]

    k = n_merges if args.naive_merges <= 0 else min(args.naive_merges, n_merges)
    naive_repeats = 1 if k == n_merges else args.repeats
    naive_s, naive_merges = timed(lambda: naive_train(text, k), naive_repeats)
    assert naive_merges == fast_merges[:k], "naive and fast trainers disagree"
    naive_full = naive_s if k == n_merges else naive_s / k * n_merges

    print(f"training to vocab {VOCAB_SIZE} ({n_merges} merges) on the whole corpus")
    print(f"  fast  (shared.tokenizer)      : {fast_s:8.2f} s")
    if k == n_merges:
        print(f"  naive (recount every merge)   : {naive_s:8.2f} s  (ran once)")
    else:
        print(
            f"  naive (recount every merge)   : {naive_s:8.2f} s for {k} merges "
            f"-> {naive_full:.0f} s extrapolated to {n_merges} (an upper estimate: "
            "later merges are cheaper)"
        )
    print(f"  speed-up fast vs naive        : {naive_full / fast_s:8.1f}x")
    print(f"  naive and fast learn the same first {k} merges: yes\n")

    # --- encoding ------------------------------------------------------------------
    gpt2 = gpt2_tokenizer()
    enc = tiktoken.get_encoding("gpt2")
    pattern = regex.compile(GPT2_PATTERN)

    def cold(tok: BPETokenizer):
        def run():
            tok.clear_cache()  # measure real work, not a warm cache from a repeat
            return tok.encode_ordinary(text)

        return run

    rows = [
        ("ours, trained vocab 1024", cold(fast_tok)),
        ("ours, GPT-2 merges", cold(gpt2)),
        ("tiktoken gpt2 (Rust)", lambda: enc.encode_ordinary(text)),
        ("regex pre-tokenization only", lambda: pattern.findall(text)),
    ]
    results = {}
    for name, fn in rows:
        seconds, _ = timed(fn, args.repeats)
        results[name] = n_bytes / seconds / 1e6
    assert gpt2.encode_ordinary(text) == enc.encode_ordinary(text)

    warm_s, _ = timed(lambda: gpt2.encode_ordinary(text), args.repeats)
    results["ours, GPT-2 merges, warm cache"] = n_bytes / warm_s / 1e6
    tik = results["tiktoken gpt2 (Rust)"]
    print("encoding the whole corpus (cold chunk cache unless said otherwise)")
    for name, mbs in results.items():
        note = "reference" if mbs == tik else f"tiktoken/this = {tik / mbs:.1f}x"
        print(f"  {name:30s}: {mbs:7.2f} MB/s  ({note})")
    print("GPT-2 mode gives the same ids as tiktoken on the whole corpus: yes")


if __name__ == "__main__":
    main()
