"""Multiple-choice tasks made from the corpus and scored by log-likelihood, as
lm-evaluation-harness does: ``acc`` (summed log-likelihood of each choice) and
``acc_norm`` (per character of the choice)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from shared.data import REPO_ROOT, read_text
from shared.dataset import train_val_split
from shared.evaluation.scoring import loglikelihood
from shared.tasks import read_jsonl, speeches

EVAL_DIR = REPO_ROOT / "data" / "eval"
MC_TASKS = ("next_line", "speaker")


@dataclass
class MCItem:
    """A multiple-choice item: a context, its choices, the index of the right one."""

    id: str
    task: str
    context: str
    choices: list[str]
    label: int


@dataclass
class MCResult:
    """Per-item log-likelihoods of every choice and the two accuracies."""

    items: list[MCItem]
    loglikelihoods: list[list[float]]
    greedy: list[list[bool]]

    @property
    def pred(self) -> np.ndarray:
        """The choice with the highest summed log-likelihood (``acc``)."""
        return np.array([int(np.argmax(ll)) for ll in self.loglikelihoods])

    @property
    def pred_norm(self) -> np.ndarray:
        """The highest log-likelihood per character of the choice (``acc_norm``)."""
        return np.array(
            [
                int(np.argmax(np.array(ll) / [len(c) for c in item.choices]))
                for ll, item in zip(self.loglikelihoods, self.items, strict=True)
            ]
        )

    @property
    def labels(self) -> np.ndarray:
        return np.array([item.label for item in self.items])

    def correct(self, norm: bool = False) -> np.ndarray:
        """Per item, 1.0 where the prediction is the label."""
        return ((self.pred_norm if norm else self.pred) == self.labels).astype(float)

    def accuracy(self, norm: bool = False) -> float:
        return float(self.correct(norm).mean())


def mc_requests(items: Sequence[MCItem]) -> list[tuple[str, str]]:
    """One ``(context, choice)`` request per choice of every item, in order."""
    return [(item.context, choice) for item in items for choice in item.choices]


def score_mc(
    model: nn.Module, tokenizer, items: Sequence[MCItem], batch_size: int = 32
) -> MCResult:
    """Score every choice of every item with ``loglikelihood``."""
    flat = loglikelihood(model, tokenizer, mc_requests(items), batch_size=batch_size)
    lls, greedy, k = [], [], 0
    for item in items:
        part = flat[k : k + len(item.choices)]
        lls.append([ll for ll, _ in part])
        greedy.append([g for _, g in part])
        k += len(item.choices)
    return MCResult(list(items), lls, greedy)


def chance_accuracy(items: Sequence[MCItem]) -> float:
    """The expected accuracy of guessing uniformly among each item's choices."""
    return float(np.mean([1 / len(item.choices) for item in items]))


def _speech_text(name: str, lines: Sequence[str], last: int = 3) -> str:
    return name + ":\n" + "\n".join(lines[-last:]) + "\n"


def make_next_line_items(
    text: str, n: int, seed: int = 0, n_choices: int = 4
) -> list[MCItem]:
    """Which of ``n_choices`` lines comes next? One item per speech of ``text``.

    Context: the speaker's name and up to three lines of the speech; the right
    choice is the speech's next line, the others are lines of other speeches (their
    lengths are not matched, which is what ``acc_norm`` is about).
    """
    rng = random.Random(seed)
    talks = speeches(text)
    pool = [
        (s, line) for s, (_, lines) in enumerate(talks) for line in lines
        if len(line.split()) >= 3
    ]  # fmt: skip
    places = [
        (s, i) for s, (_, lines) in enumerate(talks)
        for i in range(1, len(lines)) if len(lines[i].split()) >= 3
    ]  # fmt: skip
    rng.shuffle(places)
    items, used = [], set()
    for s, i in places:
        if s in used:
            continue
        used.add(s)
        name, lines = talks[s]
        answer = lines[i]
        others: list[str] = []
        while len(others) < n_choices - 1:
            t, line = rng.choice(pool)
            if t != s and line != answer and line not in others:
                others.append(line)
        choices = others + [answer]
        rng.shuffle(choices)
        context = _speech_text(name, lines[:i])
        items.append(
            MCItem(f"next_line-{len(items):04d}", "next_line", context, choices,
                   choices.index(answer))
        )  # fmt: skip
        if len(items) == n:
            break
    return items


def make_speaker_items(
    text: str, n: int, seed: int = 0, n_choices: int = 4, min_speeches: int = 3
) -> list[MCItem]:
    """Which character speaks next? One item per speech that follows another.

    Context: the previous speech (name and up to three lines). Each choice is a
    name followed by the speech's first line, so the model scores name and line
    together, ``log p(name, line | context)``; the other names are characters with
    at least ``min_speeches`` speeches in ``text``.
    """
    rng = random.Random(seed)
    talks = speeches(text)
    counts = Counter(name for name, _ in talks)
    cast = sorted(name for name, c in counts.items() if c >= min_speeches)
    order = list(range(1, len(talks)))
    rng.shuffle(order)
    items = []
    for s in order:
        name, lines = talks[s]
        if name not in cast or len(lines[0].split()) < 3:
            continue
        names = rng.sample([c for c in cast if c != name], n_choices - 1) + [name]
        rng.shuffle(names)
        prev_name, prev_lines = talks[s - 1]
        context = _speech_text(prev_name, prev_lines) + "\n"
        choices = [f"{c}:\n{lines[0]}" for c in names]
        items.append(
            MCItem(f"speaker-{len(items):04d}", "speaker", context, choices,
                   names.index(name))
        )  # fmt: skip
        if len(items) == n:
            break
    return items


def held_out_text() -> str:
    """The last 10% of Tiny Shakespeare: the text no course model was trained on."""
    return train_val_split(read_text("tinyshakespeare"), 0.1)[1]


def load_mc_items(task: str, folder: Path | None = None) -> list[MCItem]:
    """The course's multiple-choice items of ``task`` (``data/eval/{task}.jsonl``)."""
    if task not in MC_TASKS:
        raise ValueError(f"unknown task {task!r}; one of {MC_TASKS}")
    path = (folder or EVAL_DIR) / f"{task}.jsonl"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: run chapters/08_evaluation/make_tasks.py"
        )
    return read_jsonl(path, MCItem, _mc_problem)


def _mc_problem(item: MCItem) -> str | None:
    """What is wrong with a multiple-choice item read from a file (None: nothing)."""
    if not isinstance(item.context, str):
        return f"'context' is not a string: {item.context!r}"
    choices = item.choices
    if not isinstance(choices, list) or len(choices) < 2:
        return f"'choices' is not a list of at least two choices: {choices!r}"
    if not all(isinstance(c, str) for c in choices):
        return f"'choices' holds something other than strings: {choices!r}"
    label = item.label
    if type(label) is not int or not 0 <= label < len(choices):
        return f"'label' {label!r} is not a choice's index (0 to {len(choices) - 1})"
    return None
