"""Generated text and contamination: word n-grams, diversity (distinct-n),
repetition, style statistics of samples, and n-gram overlap with training text."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from shared.evaluation.multiple_choice import MCItem
from shared.generation import generate


def words(text: str) -> list[str]:
    """Lower-cased words of a text (letters and apostrophes)."""
    return [w.lower() for w in re.findall(r"[A-Za-z']+", text) if w.strip("'")]


def ngrams(tokens: Sequence, n: int) -> list[tuple]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(samples: Sequence[str], n: int) -> float:
    """Distinct word n-grams over all samples divided by all n-grams (diversity)."""
    grams = [g for s in samples for g in ngrams(words(s), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(sample: str, n: int = 4) -> float:
    """Fraction of a sample's word n-grams that already occurred earlier in it."""
    grams = ngrams(words(sample), n)
    seen: set[tuple] = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams) if grams else 0.0


def generation_stats(samples: Sequence[str], vocabulary: set[str]) -> dict[str, float]:
    """Length, diversity, repetition and style statistics of generated samples.

    ``known_words``: the fraction of generated words found in ``vocabulary`` (the
    training text's words), a crude check that the words are real;
    ``speaker_lines``: the fraction of lines that are a ``NAME:`` heading.
    """
    ws = [words(s) for s in samples]
    lines = [ln for s in samples for ln in s.split("\n") if ln.strip()]
    all_words = [w for x in ws for w in x]
    headings = [ln for ln in lines if re.fullmatch(r"[A-Z][A-Za-z ']+:", ln.strip())]
    return {
        "words": float(np.mean([len(x) for x in ws])),
        "distinct_1": distinct_n(samples, 1),
        "distinct_2": distinct_n(samples, 2),
        "repetition_4": float(np.mean([repetition_rate(s, 4) for s in samples])),
        "known_words": float(np.mean([w in vocabulary for w in all_words]))
        if all_words
        else 0.0,
        "words_per_line": len(all_words) / max(len(lines), 1),
        "speaker_lines": len(headings) / max(len(lines), 1),
    }


def sample_texts(
    model: nn.Module,
    tokenizer,
    prompt: str,
    n: int,
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> list[str]:
    """``n`` sampled continuations of one prompt (the continuation text only), each
    ending where the model emits ``<|endoftext|>`` (a fine-tuned model's stop)."""
    device = next(model.parameters()).device
    eot = tokenizer.special_tokens["<|endoftext|>"]
    idx = torch.tensor([tokenizer.encode(prompt)] * n, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = generate(
        model, idx, max_new_tokens, temperature=temperature, top_k=top_k,
        eos_id=eot, generator=gen,
    )  # fmt: skip
    texts = []
    for row in out[:, idx.size(1) :].tolist():
        texts.append(tokenizer.decode(row[: row.index(eot)] if eot in row else row))
    return texts


# -------------------------------------------------------------- contamination


def ngram_set(texts: Sequence[str], n: int) -> set[tuple]:
    """Every word n-gram of ``texts`` (the index a contamination check looks up)."""
    return {g for t in texts for g in ngrams(words(t), n)}


def ngram_overlap(texts: Sequence[str], index: set[tuple], n: int) -> np.ndarray:
    """Per text, the fraction of its word n-grams found in ``index`` (0 if it has
    none): 1.0 means every n-gram of the text occurs in the training data."""
    out = []
    for t in texts:
        grams = ngrams(words(t), n)
        out.append(np.mean([g in index for g in grams]) if grams else 0.0)
    return np.array(out, dtype=float)


def item_text(item: MCItem) -> str:
    """An item's context and right answer: the text a leak would contain."""
    return item.context + item.choices[item.label]
