"""``python -m shared.export hf OUT_DIR [--model DIR]``: a course model as a Hugging
Face GPT-2 folder (the conversion itself is ``shared.hf_export``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from shared.hf_export import export_course_model
from shared.pretrained import LAPTOP_MODEL_DIR


def main(argv: list[str] | None = None) -> Path:
    """Parse the command line, export, and list the files written."""
    ap = argparse.ArgumentParser(
        prog="python -m shared.export",
        description="Export a course GPT and its tokenizer as a Hugging Face folder.",
    )
    formats = ap.add_subparsers(dest="format", required=True)
    hf = formats.add_parser("hf", help="a Hugging Face GPT-2 folder")
    hf.add_argument("out_dir", type=Path, help="the folder to write")
    hf.add_argument(
        "--model",
        type=Path,
        default=LAPTOP_MODEL_DIR,
        help="a course model folder (default: the shipped Shakespeare model)",
    )
    args = ap.parse_args(argv)
    out = export_course_model(args.model, args.out_dir)
    print(f"exported {args.model} as a Hugging Face GPT-2 folder: {out}")
    for path in sorted(out.iterdir()):
        print(f"  {path.name:<24} {path.stat().st_size / 1024:>9.1f} KiB")
    print(f"load it with transformers.GPT2LMHeadModel.from_pretrained({str(out)!r})")
    return out


if __name__ == "__main__":
    main()
