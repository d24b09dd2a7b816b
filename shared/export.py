"""``python -m shared.export hf OUT_DIR [--model NAME_OR_DIR] [--overwrite]``: a course
model as a Hugging Face folder, GPT-2 or Llama as its config says (the conversion
itself is ``shared.hf_export`` and ``shared.llama_export``)."""

from __future__ import annotations

import argparse
import json
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
    hf = formats.add_parser(
        "hf",
        help="a Hugging Face folder: GPT2LMHeadModel, or LlamaForCausalLM for a "
        "Llama-style model (RMSNorm, SwiGLU, RoPE, no biases), chosen from its config",
        description="Write a Hugging Face folder (config, safetensors, tokenizer). "
        "The architecture follows the model's config: a GPT-2-style model becomes "
        "GPT2LMHeadModel, a Llama-style one (norm='rmsnorm', ffn='swiglu', "
        "pos_encoding='rope', bias=False, any n_kv_head) LlamaForCausalLM.",
    )
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
    arch = json.loads((out / "config.json").read_text())["architectures"][0]
    kind = "Llama" if arch == "LlamaForCausalLM" else "GPT-2"
    print(
        f"exported {args.model} as a Hugging Face {kind} folder ({arch}, chosen "
        f"from the model's config): {out}"
    )
    for path in sorted(out.iterdir()):
        print(f"  {path.name:<24} {path.stat().st_size / 1024:>9.1f} KiB")
    print(f"load it with transformers.{arch}.from_pretrained({str(out)!r})")
    return out


if __name__ == "__main__":
    main()
