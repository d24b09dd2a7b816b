"""Tests of BPETokenizer.encode_iterable: a stream gives exactly encode's ids."""

from __future__ import annotations

import itertools

import pytest
import regex
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.data import read_text
from shared.tokenizer import ENDOFTEXT, GPT2_PATTERN, BPETokenizer, gpt2_tokenizer

# pieces whose pre-tokens depend on what follows them: contractions ("'l" + "l"),
# whitespace runs (the last space joins the next word), special tokens cut in two
PIECES = [
    *"aZbé中😀1 \t\n'.,!-",
    *["42", "  ", "\r\n", " \n ", "\u00a0", "\u3000"],
    *["'s", "'t", "'ll", "'re", "'ve", "'d", "'m", "'l", "'r", "'v", "we'll", "I'M"],
    *[ENDOFTEXT, "<|end|>", "<|endof", "text|>", "<|", "|>", "<|end"],
]
SPECIALS = [ENDOFTEXT, "<|end|>"]  # sharing the prefix "<|end"
MODES = [
    {},  # the default: every special token is refused
    {"allowed_special": "all"},
    {"allowed_special": {ENDOFTEXT}},  # "<|end|>" still refused
    {"allowed_special": {"<|end|>"}, "disallowed_special": ()},
    {"disallowed_special": ()},  # special tokens as plain text
]


@pytest.fixture(scope="module")
def corpus() -> str:
    return read_text("tinyshakespeare")


@pytest.fixture(scope="module")
def gpt2() -> BPETokenizer:
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def enc() -> tiktoken.Encoding:
    return tiktoken.get_encoding("gpt2")


_SMALL: list[BPETokenizer] = []


def _small() -> BPETokenizer:
    # trained on the pieces too, so that "'ll", "  " etc. are merges: a wrong cut at
    # a chunk boundary then changes the ids, not just the pre-tokens
    if not _SMALL:
        text = read_text("tinyshakespeare")[:20_000] + " ".join(PIECES * 30)
        _SMALL.append(BPETokenizer().train(text, 450, special_tokens=SPECIALS))
    return _SMALL[0]


def _cut(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


# --- GPT-2 mode against tiktoken


def test_gpt2_stream_of_lines_matches_tiktoken(gpt2, enc, corpus):
    lines = corpus.splitlines(keepends=True)
    assert list(gpt2.encode_iterable(lines)) == enc.encode(corpus)


@pytest.mark.parametrize("size, n_chars", [(1000, 400_000), (7, 60_000)])
def test_gpt2_stream_of_fixed_chunks_matches_tiktoken(gpt2, enc, corpus, size, n_chars):
    text = corpus[:n_chars]
    assert list(gpt2.encode_iterable(_cut(text, size))) == enc.encode(text)


def test_gpt2_special_token_split_across_chunks(gpt2, enc):
    chunks = ["Hello<|endof", "text|>World"]
    expected = enc.encode("".join(chunks), allowed_special="all")
    assert list(gpt2.encode_iterable(chunks, allowed_special="all")) == expected
    with pytest.raises(ValueError, match="'<\\|endoftext\\|>' at position 5"):
        list(gpt2.encode_iterable(chunks))


# --- any text, cut anywhere


@st.composite
def text_and_chunks(draw) -> tuple[str, list[str]]:
    text = "".join(draw(st.lists(st.sampled_from(PIECES), max_size=40)))
    if draw(st.booleans()):
        return text, list(text)  # one character per chunk
    cuts = draw(st.lists(st.integers(0, len(text)), max_size=12))  # repeats: ""
    bounds = [0, *sorted(cuts), len(text)]
    return text, [text[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=text_and_chunks(), mode=st.sampled_from(MODES))
def test_stream_equals_encode_of_whole_text(case, mode):
    text, chunks = case
    tok = _small()
    try:
        expected = tok.encode(text, **mode)
    except ValueError:  # a refused special token, perhaps cut across chunks
        with pytest.raises(ValueError, match="special token"):
            list(tok.encode_iterable(iter(chunks), **mode))
    else:
        assert list(tok.encode_iterable(iter(chunks), **mode)) == expected


@settings(max_examples=200, deadline=None)
@given(case=text_and_chunks())
def test_gpt2_stream_equals_encode_of_whole_text(case):
    text, chunks = case
    gpt2 = _gpt2()
    expected = gpt2.encode(text, disallowed_special=())
    assert list(gpt2.encode_iterable(chunks, disallowed_special=())) == expected


_GPT2: list[BPETokenizer] = []


def _gpt2() -> BPETokenizer:
    if not _GPT2:
        _GPT2.append(gpt2_tokenizer())
    return _GPT2[0]


def test_surrogate_pair_split_across_chunks():
    tok = _small()
    text = "a\ud83d\ude00b \udfff\ud800"  # a pair (an emoji) and two lone surrogates
    for size in (1, 2, 3):
        assert list(tok.encode_iterable(_cut(text, size))) == tok.encode(text)


# --- streaming, in bounded memory


@pytest.mark.parametrize("mode", [{}, {"allowed_special": "all"}])
def test_stream_is_lazy(gpt2, mode):
    line = "To be, or not to be, that is the question:\n"
    if mode:
        line += ENDOFTEXT
    read = 0

    def endless():
        nonlocal read
        while True:
            read += 1
            # fail instead of hanging if the encoder wants the end of the stream
            assert read < 10_000, "encode_iterable reads on without giving ids back"
            yield line

    ids = list(itertools.islice(gpt2.encode_iterable(endless(), **mode), 1000))
    assert len(ids) == 1000
    assert read < 100  # about 14 ids a line: it read only what it needed
    assert gpt2.decode(ids).startswith(line * 3)


@pytest.mark.parametrize("size", [None, 7])
def test_stream_holds_back_only_a_few_pretokens(gpt2, corpus, size):
    assert corpus.isascii()  # one byte per character: held-back text is in bytes
    chunks = corpus.splitlines(keepends=True) if size is None else _cut(corpus, size)
    longest = max(map(len, regex.findall(GPT2_PATTERN, corpus)))
    read = given_back = held = 0

    def feed():
        nonlocal read, held
        for chunk in chunks:
            held = max(held, read - given_back)  # read, but not yet given back as ids
            read += len(chunk)
            yield chunk

    for i in gpt2.encode_iterable(feed()):
        given_back += len(gpt2.token_bytes(i))
    assert given_back == read == len(corpus)
    # two pre-tokens (a whitespace run keeps its last space) and a chunk not yet
    # scanned, at most as long as those
    assert 0 < held <= 4 * (longest + 1)


def test_stream_needs_the_gpt2_pattern():
    tok = BPETokenizer(pattern=r"\w+|\W")
    with pytest.raises(ValueError, match="GPT2_PATTERN"):
        list(tok.encode_iterable(["ab"]))
