"""The held-out evaluations of chapter 07: paraphrased instructions and a task never
trained on (``shared.tasks.make_paraphrased``, ``make_unseen``)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter

import pytest

from shared import tasks
from shared.data import REPO_ROOT as REPO
from shared.data import read_text
from shared.evaluation import task_accuracy
from shared.pretrained import load_course_model

HELD_OUT_FILES = ("instructions-paraphrased.jsonl", "instructions-unseen.jsonl")


@pytest.fixture(scope="module")
def lines() -> list[tuple[str, str]]:
    return tasks.speech_lines(read_text("tinyshakespeare"))


@pytest.fixture(scope="module")
def train() -> list[tasks.Example]:
    return tasks.load_examples("train")


def _norm(text: str) -> str:
    """Lower case, letters and spaces only: wordings that differ only in case or
    punctuation count as the same."""
    return " ".join(re.sub(r"[^a-z ]", " ", text.lower()).split())


def test_paraphrases_are_new_wordings(train):
    assert set(tasks.PARAPHRASES) == set(tasks.INSTRUCTIONS)
    trained = {_norm(e.instruction) for e in train}
    assert trained == {_norm(i) for i in tasks.INSTRUCTIONS.values()}
    every = [p for options in tasks.PARAPHRASES.values() for p in options]
    assert all(len(options) == 3 for options in tasks.PARAPHRASES.values())
    assert len({_norm(p) for p in every}) == len(every)  # all different
    assert not {_norm(p) for p in every} & trained
    assert _norm(tasks.UNSEEN_INSTRUCTION) not in {_norm(p) for p in every} | trained


def test_paraphrased_set_is_the_test_split_reworded():
    test = tasks.load_examples("test")
    reworded = tasks.load_examples("paraphrased")
    assert len(reworded) == len(test) == 496
    assert tasks.task_counts(reworded) == tasks.task_counts(test)
    for old, new in zip(test, reworded, strict=True):
        assert (new.task, new.input, new.output, new.source) == (
            old.task, old.input, old.output, old.source
        )  # fmt: skip
        assert new.instruction in tasks.PARAPHRASES[new.task]
        assert tasks.check_answer(new, old.output)
    # each task's three wordings are used about equally often
    uses = Counter((e.task, e.instruction) for e in reworded)
    for task, options in tasks.PARAPHRASES.items():
        counts = [uses[(task, p)] for p in options]
        assert min(counts) >= 32 and max(counts) - min(counts) <= 1, (task, counts)


def test_unseen_task_uses_held_out_lines_only(lines, train):
    unseen = tasks.load_examples("unseen")
    assert len(unseen) == 100 and {e.task for e in unseen} == {tasks.UNSEEN_TASK}
    assert tasks.UNSEEN_TASK not in tasks.INSTRUCTIONS
    sources = [e.source for e in unseen]
    assert len(set(sources)) == len(sources)
    assert all(tasks.is_held_out(lines[i][1]) for i in sources)
    assert not set(sources) & {e.source for e in train}
    assert all(e.instruction == tasks.UNSEEN_INSTRUCTION for e in unseen)
    assert tasks.UNSEEN_INSTRUCTION not in {e.instruction for e in train}


def test_unseen_answers_are_the_first_word(lines):
    for e in tasks.load_examples("unseen"):
        # the source line's words, found here by splitting rather than matching
        line = [w.strip("'") for w in re.split(r"[^A-Za-z']+", lines[e.source][1])]
        line = [w for w in line if w]
        words = e.input.split(" ")
        assert 3 <= len(words) <= 8
        assert any(line[k : k + len(words)] == words for k in range(len(line)))
        assert e.output == words[0]
        assert tasks.check_answer(e, f" {words[0]}\n")
        assert not tasks.check_answer(e, e.input)  # repeating is not answering


def test_make_unseen_is_seeded(lines):
    first = tasks.make_unseen(lines, per_task=20, seed=0)
    assert first == tasks.make_unseen(lines, per_task=20, seed=0)
    assert first != tasks.make_unseen(lines, per_task=20, seed=1)


def test_committed_files_are_what_the_script_writes(tmp_path):
    script = REPO / "chapters" / "07_finetuning_dpo" / "make_datasets.py"
    done = subprocess.run([sys.executable, script, "--out", tmp_path],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    for name in HELD_OUT_FILES:
        assert (tmp_path / name).read_bytes() == (tasks.DATA_DIR / name).read_bytes()


def test_task_accuracy_scores_the_held_out_sets():
    model, tokenizer, _ = load_course_model("cpu")
    examples = (
        tasks.load_examples("paraphrased")[:10] + tasks.load_examples("unseen")[:6]
    )
    acc, responses = task_accuracy(model, tokenizer, examples)
    assert set(acc) == {e.task for e in examples} | {"all"}
    assert tasks.UNSEEN_TASK in acc and len(responses) == len(examples)
    right = [tasks.check_answer(e, r) for e, r in zip(examples, responses, strict=True)]
    assert acc["all"] == sum(right) / len(examples)


def test_training_wordings_never_use_a_held_out_wording():
    def norm(s: str) -> str:
        return "".join(ch for ch in s.lower() if ch.isalnum() or ch == " ").strip()

    held_out = {norm(p) for ps in tasks.PARAPHRASES.values() for p in ps}
    held_out.add(norm(tasks.UNSEEN_INSTRUCTION))
    for task, wordings in tasks.TRAIN_PARAPHRASES.items():
        assert len(set(wordings)) == 3
        assert not {norm(w) for w in wordings} & held_out, task
    train = tasks.load_examples("train")
    varied = tasks.vary_instructions(train, seed=0)
    assert [(e.input, e.output, e.task) for e in varied] == [
        (e.input, e.output, e.task) for e in train
    ]
    used = {e.instruction for e in varied}
    assert not {norm(w) for w in used} & held_out
    for task in tasks.INSTRUCTIONS:  # every wording is used, the original too
        options = {tasks.INSTRUCTIONS[task], *tasks.TRAIN_PARAPHRASES[task]}
        mine = [e.instruction for e in varied if e.task == task]
        assert set(mine) == options
        assert max(mine.count(o) for o in options) < 0.35 * len(mine)
    assert tasks.vary_instructions(train, seed=0) == varied
