"""Write the course's instruction and preference datasets to ``data/finetune/``.

    python chapters/07_finetuning_dpo/make_datasets.py [--out DIR] [--check]

Deterministic: the same corpus gives byte-identical files. ``--check`` rebuilds in
memory and fails if the committed files differ. Besides the training and test files it
writes two evaluation-only files from held-out lines: the test examples with
paraphrased instructions, and a task never trained on. See ``shared/tasks.py`` for how
each task and each kind of rejected answer is made.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from shared import tasks
from shared.data import read_text

SIZES = {  # examples per task: (SFT train, SFT test, DPO train, DPO test)
    "per_task": (800, 100, 400, 100),
    "unseen": 100,  # examples of the task never trained on
}
# evaluation-only files (held-out lines); stats.json counts the other files
HELD_OUT_EVALS = ("instructions-paraphrased.jsonl", "instructions-unseen.jsonl")


def build() -> dict[str, list]:
    """Every file's rows, by file name."""
    lines = tasks.speech_lines(read_text("tinyshakespeare"))
    sft_train, sft_test, dpo_train, dpo_test = SIZES["per_task"]
    train = tasks.make_examples(lines, held_out=False, per_task=sft_train, seed=0)
    test = tasks.make_examples(lines, held_out=True, per_task=sft_test, seed=0)
    pref_train = tasks.make_examples(lines, held_out=False, per_task=dpo_train, seed=1)
    pref_test = tasks.make_examples(lines, held_out=True, per_task=dpo_test, seed=1)
    return {
        "instructions-train.jsonl": train,
        "instructions-test.jsonl": test,
        "preferences-train.jsonl": tasks.make_pairs(pref_train, lines, seed=0),
        "preferences-test.jsonl": tasks.make_pairs(pref_test, lines, seed=1),
        "instructions-paraphrased.jsonl": tasks.make_paraphrased(test, seed=0),
        "instructions-unseen.jsonl": tasks.make_unseen(
            lines, per_task=SIZES["unseen"], seed=0
        ),
    }


def summary(files: dict[str, list]) -> dict:
    """Counts by task (and by rejection kind for the pairs)."""
    out = {}
    for name, rows in files.items():
        by_task = dict(sorted(tasks.task_counts(rows).items()))
        entry = {"rows": len(rows), "by_task": by_task}
        if rows and hasattr(rows[0], "kind"):
            kinds: dict[str, int] = {}
            for r in rows:
                kinds[r.kind] = kinds.get(r.kind, 0) + 1
            entry["by_rejection"] = dict(sorted(kinds.items()))
        out[name] = entry
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=tasks.DATA_DIR)
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    files = build()
    counted = {name: rows for name, rows in files.items() if name not in HELD_OUT_EVALS}
    stats = json.dumps(summary(counted), indent=1) + "\n"
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            for name, rows in files.items():
                fresh = tasks.write_jsonl(Path(tmp) / name, rows).read_bytes()
                if fresh != (Path(args.out) / name).read_bytes():
                    print(f"{name} differs from the committed file", file=sys.stderr)
                    return 1
        print("committed datasets are up to date")
        return 0
    for name, rows in files.items():
        tasks.write_jsonl(Path(args.out) / name, rows)
    (Path(args.out) / "stats.json").write_text(stats)
    print(stats + json.dumps(summary({n: files[n] for n in HELD_OUT_EVALS}), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
