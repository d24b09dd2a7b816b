"""Convert a course model to GGUF, the file format of llama.cpp.

    python chapters/09_inference/to_gguf.py --llama-cpp PATH/TO/llama.cpp \
        [--model base] [--out build/gguf/shakespeare-base-f32.gguf]

It exports the model to Hugging Face's GPT-2 layout (``shared.hf_export``), then runs
llama.cpp's own ``convert_hf_to_gguf.py`` on it, with one change: the converter
identifies a tokenizer's pre-tokenizer by hashing how it splits a test string, and
the course's 1,024-token vocabulary is not in its table, so we tell it the answer,
GPT-2's pre-tokenizer (the course tokenizer uses GPT-2's split pattern). Load the
result with a context of the model's 128 tokens:
``llama_cpp.Llama(path, n_ctx=128)``. Needs a llama.cpp checkout (for the converter
and its ``gguf-py`` package); ``pip install llama-cpp-python`` runs the file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.data import REPO_ROOT
from shared.hf_export import export_hf
from shared.lora import merge_lora
from shared.pretrained import load_course_model


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", type=Path, required=True, help="a checkout")
    parser.add_argument("--model", default="base", help="base, sft, lora or dpo")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    out = args.out or REPO_ROOT / f"build/gguf/shakespeare-{args.model}-f32.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer, info = load_course_model("cpu", name=args.model)
    # with its info (name), a retrained model's export replaces the earlier one
    hf_dir = out.parent / f"hf-{args.model}"
    export_hf(merge_lora(model), tokenizer, hf_dir, info)

    sys.path[:0] = [str(args.llama_cpp), str(args.llama_cpp / "gguf-py")]
    import convert_hf_to_gguf as converter

    for cls in vars(converter).values():  # the model classes that hash the tokenizer
        if isinstance(cls, type) and "get_vocab_base_pre" in vars(cls):
            cls.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    sys.argv = ["convert_hf_to_gguf.py", str(hf_dir), "--outfile", str(out)]
    sys.argv += ["--outtype", "f32"]
    converter.main()
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
