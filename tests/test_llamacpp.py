"""The course's GGUF export run by llama.cpp itself: the same greedy tokens, logits
within float rounding, the same tokenizer, a chat model, grouped-query attention and
an untied head, and Q4_0 holding the course's int4 exactly.

llama.cpp comes from ``requirements-llamacpp.txt`` (a C++ build). Without it these
tests skip, unless ``LLM_COURSE_REQUIRE_LLAMACPP=1`` (set by CI) makes them fail.
"""

import os
import struct

import numpy as np
import pytest
import torch

from shared.chat import encode_chat, stop_id
from shared.generation import generate
from shared.gguf import (
    ALIGNMENT,
    export_gguf,
    llamacpp_greedy,
    llamacpp_logits,
    load_llamacpp,
)
from shared.model import GPT, GPTConfig
from shared.pretrained import load_course_model
from shared.quantize import quantize_model

PROMPTS = ["ROMEO:\n", "KING RICHARD II:\nWhat say you", "First Citizen:\n"]
NEW_TOKENS = 40
# float32 in both, summed in another order (and llama.cpp's GELU from an fp16
# table): measured 2.7e-3 over a full window, logits up to 18
LOGITS_ATOL = 1e-2


@pytest.fixture(scope="module")
def llama_cpp():
    if os.environ.get("LLM_COURSE_REQUIRE_LLAMACPP") == "1":
        import llama_cpp  # CI installed it: a broken build fails, never skips

        return llama_cpp
    return pytest.importorskip(
        "llama_cpp",
        reason="llama.cpp's binding is optional: "
        "pip install -r requirements-llamacpp.txt to run these tests",
    )


@pytest.fixture(scope="module")
def base():
    model, tokenizer, info = load_course_model("cpu")
    return model, tokenizer, info


@pytest.fixture(scope="module")
def base_gguf(base, tmp_path_factory):
    model, tokenizer, info = base
    path = tmp_path_factory.mktemp("gguf") / "base-f32.gguf"
    return export_gguf(model, tokenizer, path, info["name"])


def ours_greedy(model, ids, n=NEW_TOKENS) -> list[int]:
    out = generate(model, torch.tensor([ids]), n, temperature=0)
    return out[0, len(ids) :].tolist()


def ours_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


# ------------------------------------------------------------- the file itself


def test_file_layout(base, base_gguf):
    data = base_gguf.read_bytes()
    magic, version, n_tensors, n_kv = struct.unpack("<4sIQQ", data[:24])
    assert (magic, version) == (b"GGUF", 3)
    # the tied head is not written: 4 blocks x 12 tensors + wte, wpe, ln_f (2)
    assert n_tensors == 4 * 12 + 4 and n_kv > 10
    n_params = base[0].num_parameters()
    # the tensors' bytes, each padded to 32, end the file
    assert n_params * 4 <= len(data) - data.index(b"tokenizer.ggml.merges")
    assert len(data) % ALIGNMENT == 0


def test_refuses_what_gpt2_cannot_hold(base, tmp_path):
    _, tokenizer, _ = base
    rope = GPT(GPTConfig(1024, 32, 1, 2, 16, pos_encoding="rope"))
    with pytest.raises(ValueError, match="pos_encoding='rope'"):
        export_gguf(rope, tokenizer, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="dtype"):
        export_gguf(GPT(GPTConfig(1024, 32, 1, 2, 16)), tokenizer, "x", dtype="q8")


# ----------------------------------------------------------------- in llama.cpp


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_equal_ours(llama_cpp, base, base_gguf, prompt):
    model, tokenizer, _ = base
    ids = tokenizer.encode(prompt)
    theirs = llamacpp_greedy(base_gguf, ids, NEW_TOKENS)
    assert theirs == ours_greedy(model, ids)
    assert len(set(theirs)) > 5  # a real continuation, not one token repeated


def test_logits_equal_ours_over_a_full_window(llama_cpp, base, base_gguf):
    model, tokenizer, _ = base
    text = "MENENIUS:\nWhat work's, my countrymen, in hand? where go you\n" * 6
    ids = tokenizer.encode(text)[: model.config.context_length]
    assert len(ids) == 128  # every learned position in use
    theirs, ours = llamacpp_logits(base_gguf, ids), ours_logits(model, ids)
    assert theirs.shape == ours.shape == (128, 1024)
    assert np.abs(theirs - ours).max() < LOGITS_ATOL
    assert np.abs(ours).max() > 5  # not two sets of near-zero logits


def test_tokenizer_fields_give_our_ids(llama_cpp, base, base_gguf):
    _, tokenizer, _ = base
    llm = load_llamacpp(base_gguf, n_ctx=128)
    try:
        for text in [*PROMPTS, "  Thou art   a villain!\n\nHa, ha; 'tis 1593."]:
            ours = tokenizer.encode(text)
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == ours
            assert llm.detokenize(ours).decode() == text
        assert llm.token_eos() == tokenizer.special_tokens["<|endoftext|>"]
    finally:
        llm.close()


def test_chat_model_with_special_tokens(llama_cpp, tmp_path):
    model, tokenizer, info = load_course_model("cpu", name="sft")
    path = export_gguf(model, tokenizer, tmp_path / "sft.gguf", info["name"])
    messages = [{"role": "user", "content": "Who speaks first in the play?"}]
    ids, _ = encode_chat(tokenizer, messages, add_generation_prompt=True)
    assert llamacpp_greedy(path, ids, NEW_TOKENS) == ours_greedy(model, ids)
    llm = load_llamacpp(path, n_ctx=64)
    try:  # <|end|> ends a turn; the chat markers are control tokens, one id each
        assert llm.token_eos() == stop_id(tokenizer)
        assert llm.tokenize(b"<|user|>", add_bos=False, special=True) == [1025]
    finally:
        llm.close()


def test_grouped_query_attention_and_untied_head(llama_cpp, base, tmp_path):
    _, tokenizer, _ = base
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=1024, context_length=32, n_layer=2, n_head=4, n_embd=32,
        n_kv_head=2, tie_weights=False,
    )  # fmt: skip
    model = GPT(cfg).eval()
    with torch.no_grad():  # larger weights than at init: logits far from uniform
        for p in model.parameters():
            p.mul_(8 if p.dim() == 2 else 1)
    path = export_gguf(model, tokenizer, tmp_path / "gqa.gguf")
    ids = list(range(100, 132))
    theirs, ours = llamacpp_logits(path, ids), ours_logits(model, ids)
    assert np.abs(ours).max() > 1
    assert np.abs(theirs - ours).max() < LOGITS_ATOL * np.abs(ours).max()


def test_q4_0_holds_our_int4_exactly(llama_cpp, base, tmp_path):
    model, tokenizer, _ = base
    path = export_gguf(model, tokenizer, tmp_path / "q4.gguf", dtype="q4_0")
    ids = tokenizer.encode(PROMPTS[1])
    theirs = llamacpp_logits(path, ids)
    int4 = ours_logits(quantize_model(model, bits=4, group_size=32), ids)
    fp32 = ours_logits(model, ids)
    # llama.cpp multiplies Q4_0 weights by activations it rounds to 8 bits (Q8_0),
    # so it is not exact; but it is far closer to our int4 than to fp32 (measured
    # 0.086 against 1.52)
    to_int4, to_fp32 = np.abs(theirs - int4).max(), np.abs(theirs - fp32).max()
    assert to_int4 < 0.25 * to_fp32, (to_int4, to_fp32)
