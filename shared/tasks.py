"""The course's instruction tasks and preference pairs, made from Tiny Shakespeare.

Five tasks a 2M-parameter Shakespeare model can learn, each with an answer a program
can check: who speaks a line (one of eight frequent speakers), repeat the words,
reverse the words, count the words, and say a modernised line in Shakespeare's
English (a 16-entry lexicon, applied word for word). Every example is built from one
source line of the play text; a line belongs to the held-out split when a hash of its
text says so, so no source line is shared between the splits.

Two held-out evaluations ask whether a model follows instructions or only the five
sentences it was trained on: the test examples again with paraphrased instructions
(``PARAPHRASES``, ``make_paraphrased``), and a sixth task no model is trained on,
*What is the first word?* (``make_unseen``), built from held-out lines only.

Preference pairs reuse the same examples: *chosen* is the right answer, *rejected* a
checkable mistake (a wrong speaker, an off-format answer that runs on past the end,
the words not reversed, a count off by one, the line left in modern English).
``chapters/07_finetuning_dpo/make_datasets.py`` writes them to ``data/finetune/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from shared.data import REPO_ROOT, atomic_write

DATA_DIR = REPO_ROOT / "data" / "finetune"
SPEAKERS = (
    "ROMEO", "JULIET", "CORIOLANUS", "MENENIUS", "PETRUCHIO", "LEONTES",
    "DUKE VINCENTIO", "KING RICHARD II",
)  # fmt: skip
INSTRUCTIONS = {
    "speaker": "Who speaks this line?",
    "repeat": "Repeat the words.",
    "reverse": "Reverse the order of the words.",
    "count": "How many words are there?",
    "early_modern": "Say it in Shakespeare's English.",
}
# other wordings of each instruction, never used in training: does the model follow
# the request, or only the one sentence it was trained on? (``make_paraphrased``)
PARAPHRASES = {
    "speaker": (
        "Which character says this line?",
        "Name the speaker of this line.",
        "Whose words are these?",
    ),
    "repeat": (
        "Say the words again.",
        "Copy these words exactly.",
        "Write the same words back.",
    ),
    "reverse": (
        "Say these words backwards.",
        "Give the words in reverse order.",
        "Put the words in the opposite order, last word first.",
    ),
    "count": (
        "Count the words.",
        "What is the number of words?",
        "Tell me how many words this has.",
    ),
    "early_modern": (
        "Put this into the English of Shakespeare's day.",
        "Rewrite it as Shakespeare would have said it.",
        "Translate this into Early Modern English.",
    ),
}
# more wordings, for training only (``vary_instructions``): does seeing a request in
# several forms teach the model to recognise it in forms it has never seen?
TRAIN_PARAPHRASES = {
    "speaker": ("Who is speaking?", "Tell me who said this.", "Name the character."),
    "repeat": ("Echo the words.", "Repeat after me.", "Say exactly what I wrote."),
    "reverse": (
        "Flip the word order.",
        "Read the words from right to left.",
        "Turn the words around.",
    ),
    "count": ("Word count?", "How long is this, in words?", "Number of words?"),
    "early_modern": (
        "Make it sound like Shakespeare.",
        "Say it the way people spoke in 1600.",
        "Use thou and thy.",
    ),
}
UNSEEN_TASK = "first_word"  # a task no model is trained on (``make_unseen``)
UNSEEN_INSTRUCTION = "What is the first word?"
NUMBERS = "zero one two three four five six seven eight nine".split()
# modern -> early-modern, longest match first; applied word for word
LEXICON = {
    "you are": "thou art", "you have": "thou hast", "you will": "thou wilt",
    "you shall": "thou shalt", "you do": "thou dost", "it is": "'tis",
    "you": "thee", "your": "thy", "has": "hath", "does": "doth", "before": "ere",
    "often": "oft", "yes": "ay", "no": "nay", "why": "wherefore", "listen": "hark",
}  # fmt: skip
WORD = re.compile(r"[A-Za-z']+")


@dataclass
class Example:
    """One instruction example: the task, its instruction, input and answer."""

    task: str
    instruction: str
    input: str
    output: str
    source: int  # index of the source line in the corpus's speech lines


@dataclass
class Pair:
    """A preference pair: one prompt's example, a chosen and a rejected response."""

    task: str
    kind: str  # what the rejected response gets wrong
    instruction: str
    input: str
    chosen: str
    rejected: str
    source: int


def speeches(text: str) -> list[tuple[str, list[str]]]:
    """``(speaker, lines)`` of every speech of the play text (``NAME:`` then lines)."""
    out = []
    for block in text.split("\n\n"):
        lines = block.strip("\n").split("\n")
        if len(lines) >= 2 and re.fullmatch(r"[A-Z][A-Za-z ']+:", lines[0]):
            out.append((lines[0][:-1], [line for line in lines[1:] if line.strip()]))
    return out


def speech_lines(text: str) -> list[tuple[str, str]]:
    """``(speaker, line)`` for every line of every speech."""
    return [(name, line) for name, lines in speeches(text) for line in lines]


def is_held_out(line: str, percent: int = 10) -> bool:
    """True for about ``percent`` % of lines, decided by a hash of the text."""
    digest = hashlib.sha256(line.strip().encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < percent


def words_of(line: str) -> list[str]:
    """The words of a line without punctuation (apostrophes kept)."""
    return [w.strip("'") for w in WORD.findall(line) if w.strip("'")]


def _match_case(word: str, like: str) -> str:
    return word[:1].upper() + word[1:] if like[:1].isupper() else word


def _substitute(line: str, table: dict[str, str]) -> str:
    """Replace the keys of ``table`` (one or two words, longest first) in ``line``."""
    keys = sorted(table, key=lambda k: -len(k.split()))
    pattern = (
        r"(?<![A-Za-z'])(" + "|".join(re.escape(k) for k in keys) + r")(?![A-Za-z'])"
    )

    def swap(m: re.Match) -> str:
        return _match_case(table[m.group(0).lower()], m.group(0))

    return re.sub(pattern, swap, line, flags=re.IGNORECASE)


def to_early_modern(sentence: str) -> str:
    """Apply the lexicon: ``"you are my friend"`` -> ``"thou art my friend"``."""
    return _substitute(sentence, LEXICON)


def to_modern(line: str) -> str:
    """The lexicon backwards (early-modern -> modern)."""
    return _substitute(line, {v: k for k, v in LEXICON.items()})


def _early_modern_input(line: str) -> str | None:
    """A modern version of ``line`` that the lexicon maps back exactly, else None."""
    modern = to_modern(line)
    if modern == line or to_early_modern(modern) != line:
        return None
    return modern


def make_examples(
    lines: list[tuple[str, str]], held_out: bool, per_task: int, seed: int = 0
) -> list[Example]:
    """``per_task`` examples of each task from the lines of one split."""
    rng = random.Random(f"{seed}-{held_out}")
    pool = [i for i, (_, line) in enumerate(lines) if is_held_out(line) == held_out]
    out: list[Example] = []

    def add(task: str, source: int, inp: str, answer: str) -> None:
        out.append(Example(task, INSTRUCTIONS[task], inp, answer, source))

    by_task: dict[str, list[int]] = {
        "speaker": [i for i in pool if lines[i][0] in SPEAKERS
                    and 4 <= len(words_of(lines[i][1]))],
        "early_modern": [i for i in pool if _early_modern_input(lines[i][1])
                         and len(words_of(lines[i][1])) <= 10],
        "words": [i for i in pool if len(words_of(lines[i][1])) >= 3],
    }  # fmt: skip
    # speakers balanced: the same number of lines from each of the eight
    per_speaker = per_task // len(SPEAKERS)
    for name in SPEAKERS:
        theirs = [i for i in by_task["speaker"] if lines[i][0] == name]
        for i in rng.sample(theirs, min(per_speaker, len(theirs))):
            add("speaker", i, lines[i][1].strip(), name)
    chosen = by_task["early_modern"]
    for i in rng.sample(chosen, min(per_task, len(chosen))):
        add("early_modern", i, _early_modern_input(lines[i][1]), lines[i][1].strip())
    for task, lo, hi in [("repeat", 3, 8), ("reverse", 2, 6), ("count", 1, 9)]:
        for i in rng.sample(by_task["words"], per_task):
            words = words_of(lines[i][1])
            n = rng.randint(lo, min(hi, len(words)))
            start = rng.randint(0, len(words) - n)
            span = words[start : start + n]
            answer = {
                "repeat": " ".join(span),
                "reverse": " ".join(reversed(span)),
                "count": NUMBERS[n],
            }[task]
            add(task, i, " ".join(span), answer)
    rng.shuffle(out)
    return out


def vary_instructions(examples: list[Example], seed: int = 0) -> list[Example]:
    """``examples`` with each instruction drawn at random from the task's trained
    wording and its three ``TRAIN_PARAPHRASES`` (seeded; never a held-out
    ``PARAPHRASES`` wording)."""
    rng = random.Random(f"vary-{seed}")
    return [
        dataclasses.replace(
            e,
            instruction=rng.choice([INSTRUCTIONS[e.task], *TRAIN_PARAPHRASES[e.task]]),
        )
        for e in examples
    ]


def make_paraphrased(examples: list[Example], seed: int = 0) -> list[Example]:
    """``examples`` again, each once, with its instruction replaced by a paraphrase.

    Inputs, answers, sources and order are kept, so accuracy on these compares one
    to one with accuracy on ``examples``. Within each task the three paraphrases
    are dealt out in turn and shuffled with ``seed``: each is used about equally.
    """
    rng = random.Random(f"{seed}-paraphrased")
    deal: dict[str, list[str]] = {}
    for task, n in sorted(task_counts(examples).items()):
        options = PARAPHRASES[task]
        deal[task] = [options[k % len(options)] for k in range(n)]
        rng.shuffle(deal[task])
    return [dataclasses.replace(e, instruction=deal[e.task].pop()) for e in examples]


def make_unseen(
    lines: list[tuple[str, str]], per_task: int, seed: int = 0
) -> list[Example]:
    """``per_task`` examples of a task never trained on: *What is the first word?*

    Built like *repeat* from held-out lines only: 3-8 consecutive words of a line,
    punctuation removed; the answer is the first of them.

    Why this task: a tiny model can only do an unseen task by composing skills it
    has. Here both parts are trained: *repeat* teaches it to copy the input's words
    from the first one on, and *count* and *speaker* to give a one-word answer and
    stop. *What is the last word?* needs *reverse*, the hardest of the five for
    a small model, and *capital letters* needs spelling-level changes that the BPE
    tokens hide (``the`` and ``THE`` share no token). With at least three words, a
    model that just repeats the input gets it wrong: only following the new
    instruction scores.
    """
    rng = random.Random(f"{seed}-{UNSEEN_TASK}")
    pool = [i for i, (_, line) in enumerate(lines)
            if is_held_out(line) and len(words_of(line)) >= 3]  # fmt: skip
    out = []
    for i in rng.sample(pool, per_task):
        words = words_of(lines[i][1])
        n = rng.randint(3, min(8, len(words)))
        start = rng.randint(0, len(words) - n)
        span = words[start : start + n]
        out.append(Example(UNSEEN_TASK, UNSEEN_INSTRUCTION, " ".join(span), span[0], i))
    return out


def make_pairs(
    examples: list[Example], lines: list[tuple[str, str]], seed: int = 0
) -> list[Pair]:
    """One preference pair per example: the right answer against a checkable error.

    Every task's pairs mix in an off-format rejection (the answer, then more lines
    running on as if the model did not know where to stop).
    """
    rng = random.Random(seed)
    pairs = []
    for ex in examples:
        kind = "off_format" if rng.random() < 0.25 else ex.task
        if kind == "off_format":
            split = is_held_out(lines[ex.source][1])
            nxt = ex.source + 1  # the next line of the same split runs on
            while is_held_out(lines[nxt % len(lines)][1]) != split:
                nxt += 1
            more = lines[nxt % len(lines)][1].strip()
            rejected = f"{ex.output}\n{more}\n### Instruction:"
        elif kind == "speaker":
            rejected = rng.choice([s for s in SPEAKERS if s != ex.output])
        elif kind == "reverse":
            if ex.input == ex.output:  # a palindrome of words: no wrong order
                continue
            rejected = ex.input  # the words left in order
        elif kind == "count":
            n = NUMBERS.index(ex.output)
            step = rng.choice([-1, 1]) if 1 < n < 9 else (1 if n == 1 else -1)
            rejected = NUMBERS[n + step]  # off by one
        elif kind == "early_modern":
            rejected = ex.input  # left in modern English
        else:  # repeat: one word dropped
            words = ex.output.split()
            del words[rng.randrange(len(words))]
            rejected = " ".join(words)
        pairs.append(
            Pair(
                ex.task, kind, ex.instruction, ex.input, ex.output, rejected, ex.source
            )
        )
    return pairs


def check_answer(example: Example | dict, response: str) -> bool:
    """Is ``response`` (generated text, end marker removed) exactly the answer?"""
    answer = example.output if isinstance(example, Example) else example["output"]
    return response.strip() == answer.strip()


# --- files


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows (dataclasses or dicts) as one JSON object per line (atomically)."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(asdict(row) if hasattr(row, "task") else row,
                               ensure_ascii=False) + "\n")  # fmt: skip
    return path


def read_jsonl(path: Path, row: type, check: Callable | None = None) -> list:
    """The rows of a JSON-lines file as ``row`` dataclasses (blank lines skipped).

    An empty file, a line that is not a JSON object with exactly ``row``'s fields,
    or a row for which ``check(row)`` returns a complaint raises ValueError naming
    the file and the line.
    """
    fields = [f.name for f in dataclasses.fields(row)]
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err})") from err
        if not isinstance(data, dict):
            raise ValueError(f"{where}: not a JSON object: {line[:80]!r}")
        if missing := [k for k in fields if k not in data]:
            raise ValueError(f"{where}: lacks the field(s) {', '.join(missing)}")
        if unknown := [k for k in data if k not in fields]:
            raise ValueError(
                f"{where}: unknown field(s) {', '.join(unknown)} ({row.__name__} has "
                f"{', '.join(fields)})"
            )
        item = row(**data)
        if check is not None and (problem := check(item)):
            raise ValueError(f"{where}: {problem}")
        rows.append(item)
    if not rows:
        raise ValueError(f"{path} is empty: it holds no {row.__name__} rows")
    return rows


def _text_fields(*names: str) -> Callable:
    """A ``read_jsonl`` check: the named fields are strings."""

    def check(item) -> str | None:
        for name in names:
            value = getattr(item, name)
            if not isinstance(value, str):
                return f"{name!r} is not a string: {value!r}"
        return None

    return check


def load_examples(split: str = "train", folder: Path | None = None) -> list[Example]:
    """The committed instruction examples of ``split``: "train", "test", or one of
    the held-out evaluations of the test lines, "paraphrased" (unseen wordings of
    the five instructions) and "unseen" (a task never trained on)."""
    path = (folder or DATA_DIR) / f"instructions-{split}.jsonl"
    text = _text_fields("task", "instruction", "input", "output")
    return read_jsonl(path, Example, text)


def load_pairs(split: str = "train", folder: Path | None = None) -> list[Pair]:
    """The committed preference pairs of ``split`` ("train" or "test")."""
    path = (folder or DATA_DIR) / f"preferences-{split}.jsonl"
    text = _text_fields("task", "kind", "instruction", "input", "chosen", "rejected")
    return read_jsonl(path, Pair, text)


def task_counts(rows: list) -> Counter:
    """How many rows of each task."""
    return Counter(r.task for r in rows)
