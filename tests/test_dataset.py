"""Tests of shared.dataset: positional split, sliding windows, DataLoader, id cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.dataset import (
    SlidingWindowDataset,
    create_dataloader,
    token_ids_cached,
    train_val_split,
)
from shared.tokenizer import BPETokenizer, CharTokenizer, course_training_text


def test_split_by_position():
    train, val = train_val_split(list(range(100)))
    assert train == list(range(90)) and val == list(range(90, 100))
    t, v = train_val_split("abcdefghij", val_fraction=0.3)
    assert (t, v) == ("abcdefg", "hij")
    arr = np.arange(1001)
    t, v = train_val_split(arr)
    assert np.array_equal(np.concatenate([t, v]), arr) and len(v) == 101


def test_split_agrees_with_course_tokenizer_training_text():
    from shared.data import read_text

    text = read_text("tinyshakespeare")
    assert train_val_split(text)[0] == course_training_text()


def test_split_rejects_bad_fraction():
    with pytest.raises(ValueError):
        train_val_split([1, 2, 3], val_fraction=1.0)


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(2, 200),
    context_length=st.integers(1, 40),
    stride=st.integers(1, 50),
)
def test_windows_match_brute_force(n, context_length, stride):
    ids = list(range(100, 100 + n))
    expected = [
        (ids[s : s + context_length], ids[s + 1 : s + context_length + 1])
        for s in range(0, n - context_length, stride)
    ]
    if not expected:
        with pytest.raises(ValueError, match="too few"):
            SlidingWindowDataset(ids, context_length, stride)
        return
    ds = SlidingWindowDataset(ids, context_length, stride)
    assert len(ds) == len(expected)
    for (x, y), (ex, ey) in zip(ds, expected, strict=True):
        assert x.tolist() == ex and y.tolist() == ey
        assert x.dtype == y.dtype == torch.long


def test_target_is_input_shifted_by_one():
    ds = SlidingWindowDataset(
        np.arange(50, dtype=np.uint16), context_length=8, stride=3
    )
    x, y = ds[2]
    assert torch.equal(x[1:], y[:-1]) and x[0].item() == 6
    assert torch.equal(ds[-1][0], ds[len(ds) - 1][0])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_default_stride_is_context_length():
    ds = SlidingWindowDataset(torch.arange(33), context_length=8)
    assert len(ds) == 4 and ds[1][0][0].item() == 8


def test_rejects_non_integer_or_2d_ids():
    with pytest.raises(TypeError):
        SlidingWindowDataset(np.linspace(0, 1, 20), 4)
    with pytest.raises(ValueError, match="1-D"):
        SlidingWindowDataset(torch.zeros(4, 5, dtype=torch.long), 2)


def test_dataloader_shapes_and_coverage():
    ids = np.arange(1000, dtype=np.uint16)
    loader = create_dataloader(
        ids, batch_size=4, context_length=16, stride=16, shuffle=False, drop_last=False
    )
    batches = list(loader)
    assert batches[0][0].shape == (4, 16) and batches[0][1].shape == (4, 16)
    starts = torch.cat([x[:, 0] for x, _ in batches])
    assert starts.tolist() == list(range(0, 1000 - 16, 16))  # every window, in order
    dropped = create_dataloader(ids, 4, 16, 16, shuffle=False, drop_last=True)
    assert len(dropped) == len(starts) // 4


def test_dataloader_shuffle_is_reproducible_with_generator():
    ids = np.arange(500)

    def first_starts(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        loader = create_dataloader(ids, 8, 10, 5, shuffle=True, generator=g)
        return next(iter(loader))[0][:, 0].tolist()

    assert first_starts(1) == first_starts(1)
    assert first_starts(1) != first_starts(2)
    assert first_starts(1) != sorted(first_starts(1))


class CountingTokenizer:
    """Wraps a tokenizer and counts calls to encode."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0
        self.vocab_size = inner.vocab_size
        self.fingerprint = inner.fingerprint

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        return self.inner.encode(text)


def test_token_ids_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("BOOK_CACHE_DIR", str(tmp_path))
    text = "To be, or not to be, that is the question.\n" * 20
    tok = CountingTokenizer(BPETokenizer().train(text, 300))
    first = token_ids_cached(tok, text, "hamlet")
    assert tok.calls == 1 and first.dtype == np.uint16
    assert first.tolist() == tok.inner.encode(text)
    second = token_ids_cached(tok, text, "hamlet")
    assert tok.calls == 1  # read from disk
    assert np.array_equal(first, second)
    files = list((tmp_path / "tokens").glob("hamlet-*.npy"))
    assert len(files) == 1
    # another text or another tokenizer never reads those ids
    token_ids_cached(tok, text + "!", "hamlet")
    char = CharTokenizer(text)
    assert token_ids_cached(char, text, "hamlet").tolist() == char.encode(text)
    assert len(list((tmp_path / "tokens").glob("hamlet-*.npy"))) == 3
    # a damaged cache file is rebuilt
    files[0].write_bytes(b"garbage")
    assert np.array_equal(token_ids_cached(tok, text, "hamlet"), first)
    assert tok.calls == 3


def test_token_ids_cached_uses_int32_for_big_vocabularies(tmp_path, monkeypatch):
    monkeypatch.setenv("BOOK_CACHE_DIR", str(tmp_path))

    class Big:
        vocab_size = 70_000

        def encode(self, text: str) -> list[int]:
            return [69_999, 1]

    ids = token_ids_cached(Big(), "x", "big")
    assert ids.dtype == np.int32 and ids.tolist() == [69_999, 1]
