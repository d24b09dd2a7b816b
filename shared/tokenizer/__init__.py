"""Tokenizers: a character-level baseline and byte-level BPE (GPT-2 compatible).

* ``bpe.py``     - ``BPETokenizer``: GPT-2 regex pre-tokens, encode (also of a stream),
  decode, save and load; ``GPT2_PATTERN``, ``ENDOFTEXT``;
* ``trainer.py`` - the fast BPE trainer and the naive reference it is checked against;
* ``gpt2.py``    - GPT-2's merges recovered from tiktoken: ``gpt2_tokenizer()``;
* ``char.py``    - ``CharTokenizer``, one id per character;
* ``files.py``   - the file format: GPT-2's readable bytes, ``TokenizerFileError``;
* ``course.py``  - ``course_tokenizer()``, the course's BPE, cached on disk.
"""

from shared.tokenizer.bpe import BPETokenizer
from shared.tokenizer.char import CharTokenizer
from shared.tokenizer.course import course_tokenizer, course_training_text
from shared.tokenizer.files import (
    TokenizerFileError,
    bytes_to_unicode,
    from_readable,
    readable,
)
from shared.tokenizer.gpt2 import gpt2_encoding, gpt2_tokenizer
from shared.tokenizer.pretokenize import ENDOFTEXT, GPT2_PATTERN
from shared.tokenizer.trainer import naive_train, pretoken_counts, train_merges

__all__ = [
    "ENDOFTEXT",
    "GPT2_PATTERN",
    "BPETokenizer",
    "CharTokenizer",
    "TokenizerFileError",
    "bytes_to_unicode",
    "course_tokenizer",
    "course_training_text",
    "from_readable",
    "gpt2_encoding",
    "gpt2_tokenizer",
    "naive_train",
    "pretoken_counts",
    "readable",
    "train_merges",
]
