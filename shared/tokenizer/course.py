"""The course's tokenizer: BPE trained on Tiny Shakespeare, cached on disk."""

from __future__ import annotations

import hashlib

from shared.data import artefact_dir, read_text
from shared.tokenizer.bpe import BPETokenizer
from shared.tokenizer.files import FORMAT_VERSION, TokenizerFileError
from shared.tokenizer.pretokenize import ENDOFTEXT, GPT2_PATTERN


def course_training_text() -> str:
    """The training split of Tiny Shakespeare: its first 90% of characters."""
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
