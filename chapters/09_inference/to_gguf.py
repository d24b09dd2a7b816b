"""Convert a course model to GGUF, the file format of llama.cpp.

    python chapters/09_inference/to_gguf.py [--model base] [--type f32|f16|q4_0] \
        [--out build/gguf/shakespeare-base-f32.gguf]

The writer is the course's own (``shared.gguf.export_gguf``): no llama.cpp checkout
and no converter script. A LoRA model is merged into its base first. Run the file
with llama.cpp's Python binding (``pip install -r requirements-llamacpp.txt``)::

    from shared.gguf import llamacpp_greedy
    llamacpp_greedy("build/gguf/shakespeare-base-f32.gguf", ids, 40)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from shared.data import REPO_ROOT
from shared.gguf import GGML_TYPES, export_gguf
from shared.lora import merge_lora
from shared.pretrained import load_course_model


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="base", help="base, sft, lora or dpo")
    parser.add_argument("--type", default="f32", choices=list(GGML_TYPES))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    name = f"shakespeare-{args.model}-{args.type}.gguf"
    out = args.out or REPO_ROOT / "build/gguf" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer, info = load_course_model("cpu", name=args.model)
    export_gguf(merge_lora(model), tokenizer, out, info.get("name", name), args.type)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return out


if __name__ == "__main__":
    main()
