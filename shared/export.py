"""``python -m shared.export hf OUT_DIR [--model NAME_OR_DIR] [--overwrite]``: a course
model as a Hugging Face GPT-2 folder (the conversion itself is ``shared.hf_export``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from shared.hf_export import export_course_model
from shared.model_spec import MODEL_HELP, find_model


def main(argv: list[str] | None = None) -> Path:
    """Parse the command line, export, and list the files written."""
    ap = argparse.ArgumentParser(
        prog="python -m shared.export",
        description="Export a course GPT and its tokenizer as a Hugging Face folder.",
    )
    formats = ap.add_subparsers(dest="format", required=True)
    hf = formats.add_parser("hf", help="a Hugging Face GPT-2 folder")
    hf.add_argument("out_dir", type=Path, help="the folder to write")
    hf.add_argument("--model", default="base", help=f"{MODEL_HELP} (default base)")
    hf.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a folder that holds anything but an earlier export of the "
        "same model (its other files are deleted; subfolders are kept)",
    )
    args = ap.parse_args(argv)
    try:  # a bad --model is refused before any work
        model = find_model(args.model)
    except (ValueError, OSError) as err:
        hf.error(" ".join(str(err).split()))
    out = export_course_model(model, args.out_dir, overwrite=args.overwrite)
    print(f"exported {args.model} as a Hugging Face GPT-2 folder: {out}")
    for path in sorted(out.iterdir()):
        print(f"  {path.name:<24} {path.stat().st_size / 1024:>9.1f} KiB")
    print(f"load it with transformers.GPT2LMHeadModel.from_pretrained({str(out)!r})")
    return out


if __name__ == "__main__":
    main()
