"""Tests of shared.cleaning: each quality rule, exact dedup, MinHash accuracy."""

from __future__ import annotations

import random

import pytest

from shared.cleaning import (
    MinHasher,
    estimated_jaccard,
    exact_duplicates,
    jaccard,
    minhash_dedup,
    near_duplicates,
    quality_failures,
    shingles,
    top_ngram_fraction,
)

GOOD = (
    "The quality of mercy is not strained; it droppeth as the gentle rain from heaven "
    "upon the place beneath. It is twice blest: it blesseth him that gives and him "
    "that takes."
)


def test_good_document_passes():
    assert quality_failures(GOOD) == []


@pytest.mark.parametrize(
    "doc, rule",
    [
        ("Click here to subscribe", "too few words"),
        (
            GOOD + " #tag #love #insta #follow #like #me #you #now #wow",
            "symbol-to-word",
        ),
        (GOOD + " 12 34 56 78 90 11 22 33 44 55 66 77 88", "too few alphabetic words"),
        (
            " ".join(["Widget", "Gadget", "Sprocket", "Gizmo", "Doohickey"] * 5),
            "too few stop",
        ),
        ("\n".join(["Home | About | Contact the team"] * 6 + [GOOD]), "repeated lines"),
        (GOOD + " buy cheap pills now" * 12, "repeated n-grams"),
    ],
)
def test_each_rule_catches_its_case(doc, rule):
    failures = quality_failures(doc)
    assert any(f.startswith(rule) for f in failures), failures


def test_top_ngram_fraction():
    assert top_ngram_fraction("a b a b a b".split(), 2) == pytest.approx(6 / 6)
    assert top_ngram_fraction("a b c d".split(), 2) == 0.0


def test_exact_duplicates_ignore_case_and_spacing():
    docs = [GOOD, "something else entirely", GOOD.upper().replace(" ", "  \n"), GOOD]
    assert exact_duplicates(docs) == {2: 0, 3: 0}


def test_minhash_estimates_jaccard():
    rng = random.Random(0)
    words = [f"w{rng.randrange(500)}" for _ in range(400)]
    a = " ".join(words)
    b = " ".join(words[:300] + [f"x{i}" for i in range(100)])
    sa, sb = shingles(a), shingles(b)
    hasher = MinHasher(num_perm=512, seed=1)
    est = estimated_jaccard(hasher.signature(sa), hasher.signature(sb))
    assert abs(est - jaccard(sa, sb)) < 0.06


def test_near_duplicates_found_and_distinct_docs_not():
    other = "An entirely different text about the weather and the sea " * 3
    edited = GOOD.replace("gentle", "soft")
    docs = [GOOD, other, edited]
    pairs = near_duplicates(docs, threshold=0.5)
    assert [(i, j) for i, j, _ in pairs] == [(0, 2)]
    assert minhash_dedup(docs, threshold=0.5) == {2: 0}
