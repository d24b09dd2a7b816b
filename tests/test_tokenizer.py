"""Tests of shared.tokenizer, pinned against tiktoken's gpt2 as the reference."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
import requests
import tiktoken
import tiktoken.load
import tiktoken.registry
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.data import DataUnavailableError, read_text
from shared.tokenizer import (
    ENDOFTEXT,
    GPT2_PATTERN,
    BPETokenizer,
    CharTokenizer,
    TokenizerFileError,
    course_tokenizer,
    course_training_text,
    from_readable,
    gpt2_tokenizer,
    naive_train,
    readable,
)
from shared.tokenizer.gpt2 import GPT2_FILES, _tiktoken_cache_dir, gpt2_encoding
from shared.tokenizer.trainer import _desc_key

HARD_STRINGS = [
    "",
    " ",
    "\n",
    "   leading and trailing   ",
    "tabs\t\tand\n\n\nnewlines \n \n\t ",
    "a    b\t\t c\r\n\r\nd  \n  ",
    "I'm you're he'll we've they'd it's I'M DON'T 'tis o'er",
    "123 4567 89012345 3.14159 -42 1e10 1,000,000 ٣٤٥",
    "café naïve résumé Zürich ångström déjà vu",
    "e\u0301 combining acute, NFC é vs NFD e\u0301",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "中文字符 日本語のテキスト 한국어 텍스트",
    "Ελληνικά Русский текст עברית العربية",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "if (a && b || !c) { x += 1; } // <html>&amp;</html>",
    "\x00\x01\x7f control \u200b zero width \ufeff bom \ufffd replacement",
    "!!!??? ... --- *** ___ ~~~ ```python```",
    "https://example.com/path?q=1&r=2#frag user@example.org",
    "<|endoftext|> is special but <|endoftext is not, nor endoftext|>",
]


@pytest.fixture(scope="module")
def corpus() -> str:
    return read_text("tinyshakespeare")


@pytest.fixture(scope="module")
def enc() -> tiktoken.Encoding:
    return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="module")
def gpt2() -> BPETokenizer:
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def small(corpus) -> BPETokenizer:
    return BPETokenizer().train(corpus[:200_000], 512, special_tokens=[ENDOFTEXT])


# --- GPT-2 compatibility


def test_pattern_is_tiktokens(enc):
    assert GPT2_PATTERN == enc._pat_str


def test_gpt2_shape(gpt2, enc):
    assert gpt2.vocab_size == enc.n_vocab == 50257
    assert gpt2.special_tokens == {ENDOFTEXT: 50256}
    assert len(gpt2.merges) == 50000


def test_gpt2_whole_corpus_matches_tiktoken(gpt2, enc, corpus):
    ids = gpt2.encode(corpus)
    assert ids == enc.encode(corpus)
    assert gpt2.decode(ids) == corpus


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_gpt2_hard_strings_match_tiktoken(gpt2, enc, text):
    ours = gpt2.encode(text, disallowed_special=())
    assert ours == enc.encode(text, disallowed_special=())
    assert gpt2.decode(ours) == text


# Code points unassigned in this Python's Unicode database are left out: whether one
# is a letter depends on the Unicode version of the regex engine, and the `regex`
# module (newer tables) and tiktoken's Rust engine disagree on some (U+3D000: a
# letter for `regex`, so "\U0003d000'd" splits before the apostrophe, not after it).
@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.characters(exclude_categories=("Cn", "Cs"))))
def test_gpt2_matches_tiktoken_on_any_text(text):
    gpt2, enc = _gpt2_pair()
    assert gpt2.encode(text, disallowed_special=()) == enc.encode(
        text, disallowed_special=()
    )


def test_gpt2_lone_surrogates_like_tiktoken(gpt2, enc):
    text = "a\ud800b \udfff"  # not encodable as UTF-8: both replace them by U+FFFD
    assert gpt2.encode(text) == enc.encode(text)


def test_gpt2_special_token_matches_tiktoken(gpt2, enc):
    text = "Hello<|endoftext|>World"
    assert gpt2.encode(text, allowed_special="all") == enc.encode(
        text, allowed_special="all"
    )
    assert gpt2.encode(text, allowed_special={ENDOFTEXT})[1] == 50256
    with pytest.raises(ValueError):
        enc.encode(text)
    with pytest.raises(ValueError, match="special token"):
        gpt2.encode(text)


def test_gpt2_offline_names_the_missing_files(tmp_path, monkeypatch):
    cached = Path(_tiktoken_cache_dir())  # where this machine keeps GPT-2's files
    key = {
        name: hashlib.sha1(url.encode()).hexdigest() for name, url in GPT2_FILES.items()
    }
    shutil.copy(cached / key["vocab.bpe"], tmp_path)  # one of the two files

    def offline(url: str) -> bytes:
        raise requests.exceptions.ConnectionError(f"no network for {url}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # forget the loaded one
    with pytest.raises(DataUnavailableError) as info:
        gpt2_tokenizer()
    message = str(info.value)
    assert f"encoder.json: missing as {tmp_path / key['encoder.json']}" in message
    assert f"vocab.bpe: present as {tmp_path / key['vocab.bpe']}" in message
    assert f"looked for them in {tmp_path}" in message
    assert "Set TIKTOKEN_CACHE_DIR to a folder that holds these files" in message
    assert isinstance(info.value.__cause__, requests.exceptions.ConnectionError)
    (tmp_path / key["vocab.bpe"]).unlink()
    with pytest.raises(DataUnavailableError, match="vocab.bpe: missing"):
        gpt2_encoding()


_PAIR: list = []


def _gpt2_pair():
    # hypothesis tests cannot take function-scoped fixtures; cache by hand
    if not _PAIR:
        _PAIR.extend([gpt2_tokenizer(), tiktoken.get_encoding("gpt2")])
    return _PAIR


# --- round trips


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_round_trip_hard_strings(small, text):
    assert small.decode(small.encode(text, disallowed_special=())) == text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text())
def test_round_trip_any_text(text):
    tok = _small_tok()
    assert tok.decode(tok.encode(text, disallowed_special=())) == text


@settings(max_examples=300, deadline=None)
@given(data=st.binary())
def test_round_trip_any_bytes(data):
    # byte level: even bytes that are not UTF-8 come back exactly
    tok = _small_tok()
    assert tok.decode_bytes(tok.encode_bytes(data)) == data


def test_bytes_and_text_paths_agree(small, corpus):
    text = corpus[:5000] + "😀 中文"
    assert small.encode_bytes(text.encode("utf-8")) == small.encode(text)


def test_partial_utf8_decodes_with_replacement(gpt2):
    ids = gpt2.encode("😀")
    assert len(ids) > 1  # the emoji is split into byte tokens
    assert gpt2.decode(ids[:1]) == "\ufffd"
    with pytest.raises(UnicodeDecodeError):
        gpt2.decode(ids[:1], errors="strict")


def test_unknown_id_raises(small):
    with pytest.raises(ValueError, match="not in the vocabulary"):
        small.decode([small.vocab_size])


_SMALL: list = []


def _small_tok() -> BPETokenizer:
    if not _SMALL:
        text = read_text("tinyshakespeare")[:50_000]
        _SMALL.append(BPETokenizer().train(text, 400, special_tokens=[ENDOFTEXT]))
    return _SMALL[0]


# --- the training rule


def test_tie_goes_to_greater_byte_pair():
    # Pre-tokens: "cd", " cd", " bcd", " be". Hand count:
    # 1. (c,d)=3 is the most frequent pair               -> "cd"
    # 2. (" ",b)=2                                       -> " b"
    # 3. (" ",cd), (" b",cd), (" b",e) all 1: greatest byte pair is (" b", "e") -> " be"
    #    (by ids, (" b", cd) would win, since id("cd")=256 > id("e")=101)
    # 4. (" ",cd), (" b",cd) tie: (" b","cd") > (" ","cd")  -> " bcd"
    # 5. (" ",cd)                                          -> " cd"
    tok = BPETokenizer().train("cd cd bcd be", 256 + 5)
    got = [(tok.vocab[a], tok.vocab[b]) for a, b in tok.merges]
    assert got == [
        (b"c", b"d"),
        (b" ", b"b"),
        (b" b", b"e"),
        (b" b", b"cd"),
        (b" ", b"cd"),
    ]


def test_tie_compares_pairs_not_concatenations():
    # "abc" once: pairs (a,b) and (b,c) tie; (b"b", b"c") > (b"a", b"b")
    tok = BPETokenizer().train("abc", 257)
    assert [tok.vocab[i] for i in tok.merges.values()] == [b"bc"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=6), min_size=2, max_size=20))
def test_desc_key_orders_byte_strings_descending(items):
    assert sorted(items, key=_desc_key) == sorted(items, reverse=True)


@pytest.mark.parametrize("start", [0, 500_000])
def test_fast_trainer_equals_naive(corpus, start):
    text = corpus[start : start + 20_000] + " aaaaaaa aaaa aaa 😀😀 中文中文"
    tok = BPETokenizer().train(text, 256 + 150)
    fast = [(tok.vocab[a], tok.vocab[b]) for a, b in tok.merges]
    assert fast == naive_train(text, 150)


@settings(max_examples=150, deadline=None)
@given(
    text=st.text(alphabet="aab b\n'1é😀", min_size=1, max_size=200),
    n_merges=st.integers(1, 40),
)
def test_fast_trainer_equals_naive_on_random_text(text, n_merges):
    # a tiny alphabet makes ties and overlapping pairs ("aaaa") common
    tok = BPETokenizer().train(text, 256 + n_merges)
    fast = [(tok.vocab[a], tok.vocab[b]) for a, b in tok.merges]
    assert fast == naive_train(text, n_merges)


def test_training_stops_when_nothing_is_left_to_merge():
    tok = BPETokenizer().train("ab ab", 1000)
    assert tok.vocab_size < 1000
    assert tok.encode("ab ab") == [tok.merges[(97, 98)], max(tok.vocab)]


def test_special_tokens_are_never_merged_across():
    text = ("to be<|endoftext|>or not" * 50) + "<|endoftext|>"
    plain = BPETokenizer().train(text, 256 + 40)
    assert any(b"endoftext" in t for t in plain.vocab.values())  # the test can fail
    tok = BPETokenizer().train(text, 256 + 40, special_tokens=[ENDOFTEXT])
    merged = [tok.vocab[i] for i in tok.merges.values()]
    assert not any(b"endoftext" in t or b"|" in t for t in merged)
    assert tok.special_tokens == {ENDOFTEXT: tok.vocab_size - 1}  # specials come last


def test_vocab_size_counts_bytes_merges_and_specials(small):
    assert small.vocab_size == 512
    assert len(small.merges) == 512 - 256 - 1
    assert small.special_tokens[ENDOFTEXT] == 511


def test_vocab_smaller_than_bytes_raises():
    with pytest.raises(ValueError, match="smaller than 256"):
        BPETokenizer().train("abc", 256, special_tokens=["<s>"])


def test_merges_compress(small, corpus):
    tail = corpus[-20_000:]  # text not seen in training
    assert len(small.encode(tail)) < 0.6 * len(tail.encode("utf-8"))


# --- special tokens


def test_special_token_refused_by_default(small):
    with pytest.raises(ValueError, match="allowed_special"):
        small.encode(f"Hello {ENDOFTEXT} world")


def test_special_token_allowed(small):
    ids = small.encode(f"Hi{ENDOFTEXT}Hi", allowed_special={ENDOFTEXT})
    assert ids == small.encode("Hi") + [511] + small.encode("Hi")
    assert small.encode(f"Hi{ENDOFTEXT}Hi", allowed_special="all") == ids
    assert small.decode(ids) == f"Hi{ENDOFTEXT}Hi"


def test_special_token_as_plain_text(small):
    ids = small.encode(ENDOFTEXT, disallowed_special=())
    assert 511 not in ids
    assert small.decode(ids) == ENDOFTEXT


def test_several_special_tokens_longest_wins():
    tok = BPETokenizer().train("hello world", 300, special_tokens=["<a>", "<a><b>"])
    a, ab = tok.special_tokens["<a>"], tok.special_tokens["<a><b>"]
    assert tok.encode("<a><b><a>", allowed_special="all") == [ab, a]
    with pytest.raises(ValueError, match="<a>"):
        tok.encode("x<a>", allowed_special={"<a><b>"})


def test_unknown_allowed_special_raises(small):
    with pytest.raises(ValueError, match="not special tokens"):
        small.encode("hi", allowed_special={"<|im_start|>"})


# --- save / load


def test_save_load_round_trip(small, corpus, tmp_path):
    path = small.save(tmp_path / "tok.json")
    loaded = BPETokenizer.load(path)
    assert loaded.merges == small.merges
    assert loaded.special_tokens == small.special_tokens
    assert loaded.encode(corpus[:3000]) == small.encode(corpus[:3000])
    text = path.read_text(encoding="utf-8")
    data = json.loads(text)
    assert data["format"] == "llm-course-bpe-tokenizer" and data["version"] == 1
    # human readable: one merge per line, spaces shown as GPT-2 shows them
    assert '    ["Ġ", "t"],' in text.splitlines()


def test_gpt2_save_load(gpt2, enc, tmp_path):
    loaded = BPETokenizer.load(gpt2.save(tmp_path / "gpt2.json"))
    text = HARD_STRINGS[10] + HARD_STRINGS[6]
    assert loaded.encode(text) == enc.encode(text)
    assert loaded.byte_order == gpt2.byte_order


def test_readable_is_reversible():
    data = bytes(range(256))
    assert from_readable(readable(data)) == data
    assert readable(b" the\n") == "ĠtheĊ"


def test_save_load_with_duplicate_token_bytes(tmp_path):
    # two different merges that spell the same bytes ("abc"): ids must survive
    tok = BPETokenizer(
        [(97, 98), (256, 99), (98, 99), (97, 258), (259, 100), (257, 101)]
    )
    assert tok.vocab[257] == tok.vocab[259] == b"abc"
    loaded = BPETokenizer.load(tok.save(tmp_path / "dup.json"))
    assert loaded.merges == tok.merges


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"format": "llm-course-bpe-tokenizer", "version": 1, "merg', "not valid"),
        ("\x89PNG\r\n\x1a\n", "not valid"),
        ('{"model": {"type": "BPE"}}', "is not a"),
        ("[1, 2, 3]", "is not a"),
        ('{"format": "llm-course-bpe-tokenizer", "version": 99}', "version"),
        ('{"format": "llm-course-bpe-tokenizer", "version": 1}', "damaged"),
        (
            '{"format": "llm-course-bpe-tokenizer", "version": 1, "pattern": "x", '
            '"special_tokens": {}, "byte_order": null, "merges": ["ab"]}',
            "not a \\[left, right\\] pair",
        ),
    ],
)
def test_damaged_or_foreign_file_raises(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=match):
        BPETokenizer.load(path)


def test_damaged_merge_line_raises(small, tmp_path):
    path = small.save(tmp_path / "tok.json")
    lines = path.read_text(encoding="utf-8").splitlines()
    i = next(i for i, line in enumerate(lines) if line.strip().startswith('["'))
    lines[i + 20] = '    ["no such", "token"],'
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="damaged"):
        BPETokenizer.load(path)


def test_damaged_file_is_a_value_error():
    assert issubclass(TokenizerFileError, ValueError)


# --- course tokenizer and char tokenizer


def test_course_tokenizer_trains_on_first_90_percent_and_caches(
    tmp_path, monkeypatch, corpus
):
    monkeypatch.setenv("BOOK_CACHE_DIR", str(tmp_path))
    assert course_training_text() == corpus[: int(0.9 * len(corpus))]
    first = course_tokenizer(300)
    files = list((tmp_path / "tokenizers").glob("*.json"))
    assert len(files) == 1
    second = course_tokenizer(300)
    assert second.merges == first.merges
    assert first.vocab_size == 300 and first.special_tokens == {ENDOFTEXT: 299}
    direct = BPETokenizer().train(course_training_text(), 300, [ENDOFTEXT])
    assert direct.merges == first.merges


def test_char_tokenizer(tmp_path, corpus):
    tok = CharTokenizer(corpus)
    assert tok.vocab_size == 65  # nanoGPT's Shakespeare vocabulary
    sample = corpus[1000:2000]
    assert tok.decode(tok.encode(sample)) == sample
    assert tok.encode("\n !")[:2] == [0, 1]
    with pytest.raises(ValueError, match="not in this CharTokenizer"):
        tok.encode("naïve")
    loaded = CharTokenizer.load(tok.save(tmp_path / "chars.json"))
    assert loaded.chars == tok.chars
    (tmp_path / "x.json").write_text('{"format": "llm-course-bpe-tokenizer"}')
    with pytest.raises(TokenizerFileError):
        CharTokenizer.load(tmp_path / "x.json")


def test_char_decode_rejects_ids_outside_the_vocabulary(corpus):
    tok = CharTokenizer(corpus)
    assert tok.decode([0, 64]) == "\nz"
    for ids in ([-1], [65], [3, 4, -3], [1.0], ["a"]):  # -1 once decoded as "z"
        with pytest.raises(ValueError, match=r"ids must be in 0\.\.64"):
            tok.decode(ids)


def test_fingerprint_tells_tokenizers_apart(small):
    other = BPETokenizer().train("some other text, quite different", 270)
    assert small.fingerprint() != other.fingerprint()
    assert (
        small.fingerprint()
        == BPETokenizer(list(small.merges), [ENDOFTEXT]).fingerprint()
    )


def test_encoding_is_deterministic_across_instances(corpus):
    rng = random.Random(0)
    a, b = _small_tok(), BPETokenizer().train(corpus[:50_000], 400, [ENDOFTEXT])
    for _ in range(20):
        i = rng.randrange(len(corpus) - 500)
        assert a.encode(corpus[i : i + 500]) == b.encode(corpus[i : i + 500])
