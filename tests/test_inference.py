"""The model outside the course's code: transformers' text-generation pipeline on
the Hugging Face export gives the course's greedy text; llama.cpp where installed."""

import os
from pathlib import Path

import pytest

from shared.generation import complete
from shared.hf_export import export_hf
from shared.pretrained import load_course_model

PROMPTS = ["ROMEO:\n", "KING RICHARD II:\nWhat say you", "First Citizen:\n"]


@pytest.fixture(scope="module")
def base():
    model, tokenizer, _ = load_course_model("cpu")
    return model, tokenizer


@pytest.fixture(scope="module")
def hf_dir(base, tmp_path_factory):
    return export_hf(*base, tmp_path_factory.mktemp("hf") / "base")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_pipeline_greedy_text_equals_ours(base, hf_dir, prompt):
    from transformers import pipeline
    from transformers.utils import logging

    logging.set_verbosity_error()
    pipe = pipeline("text-generation", model=str(hf_dir), device="cpu")
    theirs = pipe(prompt, max_new_tokens=30, do_sample=False, return_full_text=False)
    ours = complete(*base, prompt, max_new_tokens=30, temperature=0)
    assert theirs[0]["generated_text"] == ours
    assert len(ours) > 20


def test_llama_cpp_greedy_text_equals_ours(base, tmp_path):
    # optional, not pinned: llama.cpp is a C++ build the course does not require
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (optional)"
    )
    checkout = os.environ.get("LLAMA_CPP_DIR")
    if not checkout or not (Path(checkout) / "convert_hf_to_gguf.py").exists():
        pytest.skip(
            f"no llama.cpp checkout (LLAMA_CPP_DIR={checkout!r} has no "
            "convert_hf_to_gguf.py): set LLAMA_CPP_DIR to convert the model"
        )
    import importlib.util

    from shared.data import REPO_ROOT

    spec = importlib.util.spec_from_file_location(
        "to_gguf", REPO_ROOT / "chapters/09_inference/to_gguf.py"
    )
    to_gguf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(to_gguf)
    out = to_gguf.main(["--llama-cpp", checkout, "--out", str(tmp_path / "m.gguf")])
    llm = llama_cpp.Llama(str(out), n_ctx=128, verbose=False)
    theirs = llm(PROMPTS[0], max_tokens=30, temperature=0.0)["choices"][0]["text"]
    assert theirs == complete(*base, PROMPTS[0], max_new_tokens=30, temperature=0)
