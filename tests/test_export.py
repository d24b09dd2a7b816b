"""Export to Hugging Face: GPT2LMHeadModel's logits and GPT2TokenizerFast's ids are
the course model's and the course tokenizer's."""

import json
import random
import subprocess
import sys
import unicodedata

import pytest
import regex
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2LMHeadModel,
    GPT2TokenizerFast,
)

from shared.data import read_text, sha256sum
from shared.export import main
from shared.generation import generate
from shared.hf_export import export_hf, hf_state_dict, load_hf, save_hf_tokenizer
from shared.model import GPT, GPTConfig
from shared.pretrained import LAPTOP_MODEL_DIR, load_course_model
from shared.tokenizer import (
    ENDOFTEXT,
    BPETokenizer,
    CharTokenizer,
    gpt2_encoding,
    gpt2_tokenizer,
)

FILES = {"config.json", "generation_config.json", "model.safetensors", "vocab.json"}
FILES |= {"merges.txt", "tokenizer.json", "tokenizer_config.json"}
FILES |= {"special_tokens_map.json", "course_info.json"}
PROMPTS = [
    "ROMEO:",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "KING RICHARD III:\nNow is the winter of our discontent\nMade glorious summer",
    "What's in a name? That which we call a rose",
]
EDGE_CASES = [
    "",
    " ",
    "\n",
    "hello  world",
    "   leading spaces",
    "trailing spaces   ",
    "trailing newline\n",
    "\n\n\nthree newlines first",
    "a \n\n  b  \n ",
    "tabs\t\tand\r\nCRLF\r\n",
    "digits 0123456789 3.14159 1e10 2,000,000",
    "I'm you're they'll we'd it's don't 'S 'T DON'T can't've ''''",
    "naïve café — “quotes” … ½ ² ©",
    "日本語 中文 한국어 Ελληνικά русский עברית العربية",
    "emoji 🤗🎉 👨\u200d👩\u200d👧 ❤️ 👍🏽",
    "\u00a0nbsp \u2003em-space \u3000ideographic \u2028line \x85next",
    "\x1c\x1d\x1e\x1f\x0b\x0c controls",
    "zero\u200bwidth\ufeffbom",
    "!!!???... ---___ ***",
    "<|endoftext> <|endoftext| endoftext",
]


@pytest.fixture(scope="module")
def course():
    return load_course_model("cpu")


@pytest.fixture(scope="module")
def folder(course, tmp_path_factory):
    model, tokenizer, info = course
    return export_hf(model, tokenizer, tmp_path_factory.mktemp("hf"), info)


@pytest.fixture(scope="module")
def hf(folder):
    return load_hf(folder)


def course_logits(model: GPT, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


# ---------------------------------------------------------------------------- folder


def test_folder_holds_a_clean_gpt2_checkpoint(folder, course):
    assert {p.name for p in folder.iterdir()} == FILES
    model, info = GPT2LMHeadModel.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    config = json.loads((folder / "config.json").read_text())
    assert config["n_positions"] == 128 and config["activation_function"] == "gelu_new"
    assert config["eos_token_id"] == config["bos_token_id"] == 1023
    info = json.loads((folder / "course_info.json").read_text())
    record = info.pop("hf_export")  # what identifies an earlier export
    assert info == course[2]
    digest = sha256sum(folder / "model.safetensors")
    assert record == {"name": "shakespeare-laptop", "model_sha256": digest}
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == 1023
    assert tokenizer.model_max_length == 128 and len(tokenizer) == 1024
    assert isinstance(AutoModelForCausalLM.from_pretrained(folder), GPT2LMHeadModel)


def test_tied_head_is_written_once(course):
    keys = set(hf_state_dict(course[0]))
    assert "lm_head.weight" not in keys and "transformer.wte.weight" in keys


# ---------------------------------------------------------------------------- model


def test_logits_equal_the_course_model(course, hf):
    model, tokenizer, _ = course
    text = read_text("tinyshakespeare")
    full = tokenizer.encode(text[:2000])[:128]  # a whole context window
    diffs = []
    for ids in [tokenizer.encode(p) for p in PROMPTS] + [full]:
        with torch.no_grad():
            theirs = hf[0](torch.tensor([ids])).logits[0]
        ours = course_logits(model, ids)
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
        diffs.append((theirs - ours).abs().max().item())
    print(f"max |logit difference| = {max(diffs):.2e}")


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_each_prompt_alone(course, folder, hf, side):
    model, tokenizer, _ = course
    hf_model = hf[0]
    hf_tokenizer = GPT2TokenizerFast.from_pretrained(
        folder, pad_token=ENDOFTEXT, padding_side=side
    )
    batch = hf_tokenizer(PROMPTS, return_tensors="pt", padding=True)
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: rows start at 0
    with torch.no_grad():
        logits = hf_model(**batch, position_ids=positions).logits
    for row, prompt in enumerate(PROMPTS):
        real = mask[row].bool()
        ours = course_logits(model, tokenizer.encode(prompt))
        torch.testing.assert_close(logits[row, real], ours, atol=1e-4, rtol=0)


def test_greedy_generation_equals_the_course(course, hf):
    model, tokenizer, _ = course
    idx = torch.tensor([tokenizer.encode("ROMEO:")])
    ours = generate(model, idx, 40, temperature=0)[0].tolist()
    with torch.no_grad():
        theirs = (
            hf[0]
            .generate(
                idx,
                attention_mask=torch.ones_like(idx),
                do_sample=False,
                max_new_tokens=40,
            )[0]
            .tolist()
        )
    if 1023 in ours[idx.size(1) :]:  # HF stops at <|endoftext|>, ours goes on
        ours = ours[: ours.index(1023, idx.size(1)) + 1]
    assert theirs == ours


# ---------------------------------------------------------------------------- tokenizer


def test_ids_equal_on_tiny_shakespeare(course, hf):
    tokenizer, hf_tokenizer = course[1], hf[1]
    text = read_text("tinyshakespeare")[:50_000]
    assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text)
    lines = text.splitlines(keepends=True)
    assert hf_tokenizer(lines)["input_ids"] == [tokenizer.encode(s) for s in lines]


@pytest.mark.parametrize("text", EDGE_CASES)
def test_ids_equal_on_edge_cases(course, hf, text):
    ids = hf[1](text)["input_ids"]
    assert ids == course[1].encode(text)
    assert hf[1].decode(ids) == text


def test_endoftext_is_special_unless_split(course, hf):
    tokenizer, hf_tokenizer = course[1], hf[1]
    text = f"The end.{ENDOFTEXT}ROMEO: hi{ENDOFTEXT}"
    ids = hf_tokenizer(text)["input_ids"]
    assert ids == tokenizer.encode(text, allowed_special="all")
    assert ids.count(1023) == 2
    split = hf_tokenizer(text, split_special_tokens=True)["input_ids"]
    assert split == tokenizer.encode(text, disallowed_special=())
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == "The end.ROMEO: hi"


def test_ids_equal_on_every_script(course, hf):
    # every code point Python's Unicode tables know (below U+3000 all of them, above
    # every 50th), as a letter between letters, doubled before a digit, and before 's
    known = [
        chr(c)
        for c in range(0x110000)
        if (c < 0x3000 or c % 50 == 0)
        and unicodedata.category(chr(c)) not in ("Cn", "Cs")
    ]
    lines = [f"x{c}y {c}{c}1 {c}'s\n" for c in known]
    assert hf[1](lines)["input_ids"] == [course[1].encode(s) for s in lines]


def test_newest_letters_still_decode(hf):
    # letters newer than the `tokenizers` library's Unicode tables split differently
    # (see shared/hf_export.py), but the ids still spell the text
    new = [
        chr(c)
        for c in range(0x10000, 0x20000)
        if unicodedata.category(chr(c)) == "Cn" and regex.match(r"\p{L}", chr(c))
    ]
    text = "".join(f" x{c}y{c}'s" for c in new)
    assert hf[1].decode(hf[1](text)["input_ids"]) == text


def test_decode_equals_the_course_on_random_ids(course, hf):
    # random ids often cut UTF-8 sequences: both must replace the same bytes by U+FFFD
    rng = random.Random(0)
    for _ in range(500):
        ids = [rng.randrange(1024) for _ in range(rng.randrange(1, 12))]
        assert hf[1].decode(ids) == course[1].decode(ids)


def test_gpt2_tokenizer_exports_to_tiktokens_ids(tmp_path):
    # GPT-2's byte ids are not in byte order: vocab.json must carry its permutation
    save_hf_tokenizer(gpt2_tokenizer(), tmp_path, 1024)
    hf_tokenizer = GPT2TokenizerFast.from_pretrained(tmp_path)
    encoding = gpt2_encoding()
    texts = [read_text("tinyshakespeare")[:20_000]] + EDGE_CASES
    for text in texts:
        assert hf_tokenizer(text)["input_ids"] == encoding.encode_ordinary(text)


def test_tokenizer_without_special_tokens(tmp_path):
    tokenizer = BPETokenizer().train("the cat sat on the mat " * 20, 270)
    save_hf_tokenizer(tokenizer, tmp_path, 16)
    hf_tokenizer = GPT2TokenizerFast.from_pretrained(tmp_path)
    assert hf_tokenizer.eos_token is None
    assert len(hf_tokenizer) == tokenizer.vocab_size
    text = "the mat sat on the cat"
    assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text)


# ---------------------------------------------------------------------------- tiny GPTs


def tiny_gpt(**overrides) -> GPT:
    """A random GPT whose biases and LayerNorms are not 0 and 1 (so they are tested)."""
    torch.manual_seed(0)
    shape = dict(vocab_size=320, context_length=16, n_layer=2, n_head=4, n_embd=32)
    model = GPT(GPTConfig(**(shape | overrides))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name or "ln_f" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def tiny_tokenizer():
    text = read_text("tinyshakespeare")[:5000]
    return BPETokenizer().train(text, 300, special_tokens=[ENDOFTEXT])


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(tie_weights=False), dict(ffn_hidden=40, dropout=0.1)],
    ids=["tied", "untied", "ffn_hidden+dropout"],
)
def test_tiny_gpt_exports_exactly(tiny_tokenizer, tmp_path, overrides):
    # a model vocabulary larger than the tokenizer's (padded, as for speed) is fine
    model = tiny_gpt(**overrides)
    export_hf(model, tiny_tokenizer, tmp_path)
    hf_model, info = GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    config = hf_model.config
    assert config.tie_word_embeddings == model.config.tie_weights
    assert config.resid_pdrop == config.attn_pdrop == model.config.dropout
    idx = torch.randint(0, 320, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(idx).logits, model(idx), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "overrides, why",
    [
        (dict(pos_encoding="rope"), "pos_encoding='rope'"),
        (dict(pos_encoding="sinusoidal"), "pos_encoding='sinusoidal'"),
        (dict(norm="rmsnorm"), "norm='rmsnorm'"),
        (dict(ffn="swiglu"), "ffn='swiglu'"),
        (dict(bias=False), "bias=False"),
    ],
)
def test_refuses_models_gpt2_cannot_hold(tiny_tokenizer, tmp_path, overrides, why):
    with pytest.raises(ValueError, match=f"cannot represent.*{regex.escape(why)}"):
        export_hf(tiny_gpt(**overrides), tiny_tokenizer, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_refuses_tokenizers_gpt2_cannot_hold(tiny_tokenizer, tmp_path):
    model = tiny_gpt()
    # two merge orders that build the same bytes: vocab.json has one id per string
    twice = BPETokenizer([(97, 98), (256, 99), (98, 99), (97, 258)])
    with pytest.raises(ValueError, match="two ids"):
        export_hf(model, twice, tmp_path)
    other = BPETokenizer(pattern=r"\w+|\s+|[^\w\s]+")
    with pytest.raises(ValueError, match="GPT-2's pattern"):
        export_hf(model, other, tmp_path)
    with pytest.raises(ValueError, match="only 16 ids"):
        export_hf(tiny_gpt(vocab_size=16), tiny_tokenizer, tmp_path)
    with pytest.raises(TypeError, match="byte-level BPETokenizer"):
        export_hf(model, CharTokenizer("abc"), tmp_path)


def test_refuses_to_overwrite_a_course_model_folder(tiny_tokenizer, tmp_path):
    course_config = (LAPTOP_MODEL_DIR / "config.json").read_text()
    (tmp_path / "config.json").write_text(course_config)
    with pytest.raises(ValueError, match="not a Hugging Face config"):
        export_hf(tiny_gpt(), tiny_tokenizer, tmp_path)
    assert (tmp_path / "config.json").read_text() == course_config


def another_model(folder):
    """A Llama folder, sharded weights' index and all, as a reader might have one."""
    folder.mkdir(exist_ok=True)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    files = {"config.json": json.dumps(config), "model.safetensors": "weights"}
    files["model.safetensors.index.json"] = '{"weight_map": {}}'
    for name, text in files.items():
        (folder / name).write_text(text)
    return {name: (folder / name).read_bytes() for name in files}


def test_refuses_a_folder_that_holds_another_model(tiny_tokenizer, tmp_path):
    before = another_model(tmp_path)
    with pytest.raises(FileExistsError) as refused:
        export_hf(tiny_gpt(), tiny_tokenizer, tmp_path)
    message = str(refused.value)
    assert "config.json, model.safetensors, model.safetensors.index.json" in message
    assert "a Hugging Face llama model, LlamaForCausalLM" in message
    assert "--overwrite" in message and "Nothing was written" in message
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_refuses_a_folder_that_holds_a_readers_own_tokenizer(tiny_tokenizer, tmp_path):
    (tmp_path / "vocab.json").write_text('{"mine": 0}')
    (tmp_path / "merges.txt").write_text("#version: 0.2\nm ine\n")
    with pytest.raises(FileExistsError, match="merges.txt, vocab.json"):
        export_hf(tiny_gpt(), tiny_tokenizer, tmp_path)
    assert (tmp_path / "vocab.json").read_text() == '{"mine": 0}'


def test_overwrite_replaces_the_folder_and_leaves_no_stale_files(
    tiny_tokenizer, tmp_path
):
    another_model(tmp_path)
    (tmp_path / "notes").mkdir()  # a subfolder is kept
    model = tiny_gpt()
    export_hf(model, tiny_tokenizer, tmp_path, overwrite=True)
    written = FILES - {"course_info.json"}  # no info given
    assert {p.name for p in tmp_path.iterdir()} == written | {"notes"}
    hf_model = GPT2LMHeadModel.from_pretrained(tmp_path)  # no stale index read
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, model(ids), atol=1e-4, rtol=0)


def test_an_earlier_export_of_the_same_weights_is_replaced_other_weights_refused(
    tiny_tokenizer, tmp_path
):
    export_hf(tiny_gpt(), tiny_tokenizer, tmp_path, info={"run": 1})
    export_hf(tiny_gpt(), tiny_tokenizer, tmp_path, info={"run": 2})  # harmless
    assert json.loads((tmp_path / "course_info.json").read_text())["run"] == 2
    other = tiny_gpt(tie_weights=False)
    with pytest.raises(FileExistsError, match="model.safetensors holds other weights"):
        export_hf(other, tiny_tokenizer, tmp_path)
    export_hf(other, tiny_tokenizer, tmp_path, overwrite=True)
    assert not GPT2LMHeadModel.from_pretrained(tmp_path).config.tie_word_embeddings


def test_a_retrained_course_model_replaces_its_own_untouched_export(
    tiny_tokenizer, tmp_path
):
    export_hf(tiny_gpt(), tiny_tokenizer, tmp_path, info={"name": "m"})
    retrained = tiny_gpt(tie_weights=False)
    export_hf(retrained, tiny_tokenizer, tmp_path, info={"name": "m"})  # refreshed
    with pytest.raises(FileExistsError, match="not an earlier export of this model"):
        export_hf(tiny_gpt(), tiny_tokenizer, tmp_path, info={"name": "other"})
    # weights changed after the export (say, trained further in Hugging Face)
    hf_model = GPT2LMHeadModel.from_pretrained(tmp_path)
    with torch.no_grad():
        hf_model.transformer.wte.weight.add_(1.0)
    hf_model.save_pretrained(tmp_path)
    with pytest.raises(FileExistsError, match="holds other weights"):
        export_hf(tiny_gpt(), tiny_tokenizer, tmp_path, info={"name": "m"})


# ---------------------------------------------------------------------------- CLI


def test_command_line_writes_a_folder_that_loads(tmp_path, capsys, course):
    out = main(["hf", str(tmp_path / "export"), "--model", str(LAPTOP_MODEL_DIR)])
    printed = capsys.readouterr().out
    assert all(name in printed for name in FILES)
    hf_model, hf_tokenizer = load_hf(out)
    ids = hf_tokenizer("ROMEO:")["input_ids"]
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(theirs, course_logits(course[0], ids), atol=1e-4, rtol=0)


def test_command_line_merges_a_lora_adapter(tmp_path, capsys):
    from shared.pretrained import load_course_model

    lora_model, tok, _ = load_course_model("cpu", name="lora")
    folder = LAPTOP_MODEL_DIR.parent / "shakespeare-lora"
    out = main(["hf", str(tmp_path / "lora"), "--model", str(folder)])
    assert "merged the LoRA adapter" in capsys.readouterr().out
    hf_model, _ = load_hf(out)
    ids = tok.encode("### Instruction:\nRepeat the words.")
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids])).logits[0]
        ours = lora_model(torch.tensor([ids]))[0]
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_command_line_refuses_a_full_folder_unless_overwrite(tmp_path, capsys):
    before = another_model(tmp_path / "llama")
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(["hf", str(tmp_path / "llama")])
    assert {p.name: p.read_bytes() for p in (tmp_path / "llama").iterdir()} == before
    out = main(["hf", str(tmp_path / "llama"), "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    main(["hf", str(tmp_path / "llama")])  # an export of the same weights again


def test_import_is_cheap():
    code = "import sys, shared.export; print('transformers' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
