"""``python -m shared.evaluate``: every chapter-8 metric for course models, one
table (the metrics themselves are ``shared.evaluation``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shared.evaluation import (
    MC_TASKS,
    evaluate_model,
    held_out_text,
    load_mc_items,
    report_table,
)
from shared.pretrained import COURSE_MODELS, load_course_model
from shared.tasks import load_examples


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """``python -m shared.evaluate [--model NAME_OR_DIR ...] [--quick] [--json F]``."""
    parser = argparse.ArgumentParser(
        prog="python -m shared.evaluate",
        description="Evaluate course models on every chapter-08 metric.",
    )
    parser.add_argument(
        "--model", nargs="+", default=list(COURSE_MODELS),
        help="course model names (base, sft, lora, dpo) or model folders",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="small subsets (checks)")
    parser.add_argument("--json", type=Path, help="also write the reports here")
    args = parser.parse_args(argv)
    kwargs: dict = {}
    if args.quick:
        kwargs = dict(
            text=held_out_text()[:20_000],
            items={t: load_mc_items(t)[:40] for t in MC_TASKS},
            examples=load_examples("test")[::25],
            n_samples=4,
            max_new_tokens=40,
        )
    reports = {}
    for spec in args.model:
        if spec in COURSE_MODELS:
            model, tokenizer, _ = load_course_model(name=spec)
        else:
            model, tokenizer, _ = load_course_model(path=spec)
        reports[Path(spec).name] = evaluate_model(model, tokenizer, **kwargs)
        print(f"{spec}: {reports[Path(spec).name]['seconds']:.0f} s", flush=True)
    print(report_table(reports, text=True))
    if args.json:
        args.json.write_text(json.dumps(reports, indent=1))
    return reports


if __name__ == "__main__":
    main()
