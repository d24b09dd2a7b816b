"""The model outside the course's code: transformers' text-generation pipeline on
the Hugging Face export gives the course's greedy text (llama.cpp on the GGUF
export: tests/test_llamacpp.py)."""

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
