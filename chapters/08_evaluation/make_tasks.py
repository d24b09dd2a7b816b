"""Write the course's multiple-choice evaluation tasks to ``data/eval/``.

    python chapters/08_evaluation/make_tasks.py [--out DIR] [--check]

Both tasks are made from the last 10% of Tiny Shakespeare, the text no course model
was trained on: ``next_line`` (which of four lines comes next in a speech) and
``speaker`` (which of four characters speaks next). Deterministic: ``--check``
rebuilds them in memory and fails if the committed files differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from shared import evaluation

SIZES = {"next_line": 435, "speaker": 500}  # every speech with a next line: 435


def build() -> dict[str, list[evaluation.MCItem]]:
    text = evaluation.held_out_text()
    return {
        "next_line": evaluation.make_next_line_items(text, SIZES["next_line"], seed=0),
        "speaker": evaluation.make_speaker_items(text, SIZES["speaker"], seed=0),
    }


def encode(items: list[evaluation.MCItem]) -> bytes:
    rows = [json.dumps(asdict(item), ensure_ascii=False) for item in items]
    return ("\n".join(rows) + "\n").encode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=evaluation.EVAL_DIR)
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    for task, items in build().items():
        path = args.out / f"{task}.jsonl"
        if args.check:
            if not path.exists() or path.read_bytes() != encode(items):
                print(f"{path} differs from a fresh build", file=sys.stderr)
                return 1
            continue
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(items))
        print(f"{path}: {len(items)} items")
    if args.check:
        print("committed tasks are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
