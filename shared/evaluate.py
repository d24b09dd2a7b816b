"""``python -m shared.evaluate``: every chapter-8 metric for course models, one
table (the metrics themselves are ``shared.evaluation``).

The table goes to stdout; progress goes to stderr: the work up front, a line per
stage of each model, and after the first model an estimate of the time left."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

from shared.evaluation import (
    MC_TASKS,
    evaluate_models,
    held_out_text,
    load_mc_items,
    report_table,
)
from shared.model_spec import MODEL_HELP, find_models, load_model
from shared.pretrained import COURSE_MODELS
from shared.tasks import load_examples


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """``python -m shared.evaluate [--model NAME_OR_DIR ...] [--quick] [--json F]``."""
    parser = argparse.ArgumentParser(
        prog="python -m shared.evaluate",
        description="Evaluate course models on every chapter-08 metric.",
    )
    parser.add_argument(
        "--model", nargs="+", default=list(COURSE_MODELS),
        help=f"one or more of: {MODEL_HELP} (default: the four course models)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="small subsets (checks)")
    parser.add_argument("--json", type=Path, help="also write the reports here")
    args = parser.parse_args(argv)
    out = args.json
    try:  # every model and the output folder before minutes of work
        if out and not os.access(out.parent, os.W_OK):
            raise ValueError(f"--json {out}: {out.parent} is missing or read-only")
        if out and out.is_dir():
            raise ValueError(f"--json {out} is a folder; give a file name in it")
        models = [(m.name, load_model(m)) for m in find_models(args.model)]
    except Exception as err:  # an unknown name, a damaged model folder
        parser.error(" ".join(str(err).split()))
    kwargs: dict = dict(
        text=held_out_text(),
        items={t: load_mc_items(t) for t in MC_TASKS},
        examples=load_examples("test"),
        n_samples=16,
        max_new_tokens=100,
    )
    if args.quick:
        kwargs = dict(
            text=kwargs["text"][:20_000],
            items={t: items[:40] for t, items in kwargs["items"].items()},
            examples=kwargs["examples"][::25],
            n_samples=4,
            max_new_tokens=40,
        )
    say = functools.partial(print, file=sys.stderr, flush=True)  # stdout: the table
    named = [(name, model, tokenizer) for name, (model, tokenizer, _) in models]
    reports = evaluate_models(named, say, **kwargs)
    print(report_table(reports, text=True), flush=True)
    if out:
        out.write_text(json.dumps(reports, indent=1))
    return reports


if __name__ == "__main__":
    main()
