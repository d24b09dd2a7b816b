"""Export a course GPT and its tokenizer as a Hugging Face GPT-2 folder.

``export_hf(model, tokenizer, "out")`` writes what ``GPT2LMHeadModel.from_pretrained``
and ``GPT2TokenizerFast.from_pretrained`` (and the ``Auto`` classes) read::

    out/
      config.json             GPT2Config: the shapes, gelu_new, LayerNorm eps, tying
      generation_config.json  bos/eos/pad = <|endoftext|>
      model.safetensors       GPT-2's names; Linear (out, in) -> Conv1D (in, out)
      vocab.json, merges.txt  tokens in GPT-2's printable byte alphabet, merges by rank
      tokenizer.json          the same BPE for the ``tokenizers`` library
      tokenizer_config.json   special tokens, model_max_length = context length
      special_tokens_map.json
      course_info.json        the course's own record (configs, results), if given

From the command line: ``python -m shared.export hf OUT_DIR [--model DIR]``
(``export_course_model``: a shipped model folder, its LoRA adapter merged).

The Hugging Face tokenizer gives the course tokenizer's ids, with three exceptions:

* ``<|endoftext|>`` in the text always becomes its id, as with the course's
  ``encode(text, allowed_special="all")`` (the course refuses it by default); with
  ``split_special_tokens=True`` it is plain text, as with ``disallowed_special=()``;
* letters and digits new in Unicode 17 or later: the course's ``regex`` module knows
  them as ``\\p{L}``/``\\p{N}``, the ``tokenizers`` library (like tiktoken) not yet, and
  splits them off as symbols. Ids can then differ (Hugging Face's are tiktoken's);
  they decode to the same text;
* lone surrogates: the course replaces them by U+FFFD, Hugging Face raises.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from shared.gpt2_weights import CONV1D_WEIGHTS
from shared.lora import lora_layers, merge_lora
from shared.model import GPT
from shared.pretrained import load_course_model
from shared.tokenizer import ENDOFTEXT, GPT2_PATTERN, BPETokenizer, readable

MERGES_HEADER = "#version: 0.2"  # the first line of GPT-2's merges.txt


# ---------------------------------------------------------------------------- checks


def check_exportable(model: GPT) -> None:
    """Raise ValueError unless Hugging Face's GPT-2 can hold this model exactly."""
    if not isinstance(model, GPT):
        raise TypeError(f"expected a shared.model.GPT, got {type(model).__name__}")
    cfg = model.config
    problems = []
    if cfg.pos_encoding != "learned":
        problems.append(f"pos_encoding={cfg.pos_encoding!r} (GPT-2 learns positions)")
    if cfg.norm != "layernorm":
        problems.append(f"norm={cfg.norm!r} (GPT-2 uses LayerNorm)")
    if cfg.ffn != "gelu":
        problems.append(f"ffn={cfg.ffn!r} (GPT-2's MLP is GELU)")
    if not cfg.bias:
        problems.append("bias=False (GPT-2 has biases in every Linear and LayerNorm)")
    if problems:
        raise ValueError(
            "Hugging Face's GPT-2 cannot represent this model: "
            + "; ".join(problems)
            + ". Only GPT-2-style models (GPTConfig's defaults) export to GPT-2; "
            "tie_weights=False is fine."
        )


def check_tokenizer(tokenizer: BPETokenizer, vocab_size: int) -> None:
    """Raise ValueError unless a GPT-2 byte-level BPE gives this tokenizer's ids."""
    if not isinstance(tokenizer, BPETokenizer):
        raise TypeError(
            f"expected a byte-level BPETokenizer, got {type(tokenizer).__name__}"
        )
    if tokenizer.pattern != GPT2_PATTERN:
        raise ValueError(
            "Hugging Face's GPT-2 tokenizer splits text with GPT-2's pattern only; "
            f"this tokenizer uses {tokenizer.pattern!r}"
        )
    # vocab.json maps each token's bytes to one id: two ids with the same bytes
    # (possible when two merge orders build one string) cannot both be written
    strings = [readable(b) for b in tokenizer.vocab.values()]
    strings += list(tokenizer.special_tokens)
    shared = [s for s, n in Counter(strings).items() if n > 1]
    if shared:
        raise ValueError(
            f"{len(shared)} token strings belong to two ids each (e.g. "
            f"{shared[0]!r}); vocab.json can hold only one id per token"
        )
    top = max([len(tokenizer.vocab) - 1, *tokenizer.special_tokens.values()])
    if top >= vocab_size:
        raise ValueError(
            f"the tokenizer uses id {top}, the model has only {vocab_size} ids"
        )


# ---------------------------------------------------------------------------- model


def hf_config(model: GPT, tokenizer: BPETokenizer):
    """The ``transformers.GPT2Config`` of ``model`` (eos/bos = <|endoftext|>)."""
    from transformers import GPT2Config

    cfg = model.config
    eot = tokenizer.special_tokens.get(ENDOFTEXT)
    dtype = model.transformer.wte.weight.dtype
    return GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.context_length,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=None if cfg.hidden_size == 4 * cfg.n_embd else cfg.hidden_size,
        activation_function="gelu_new",  # GELU's tanh approximation, as in MLP
        layer_norm_epsilon=model.transformer.ln_f.eps,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        tie_word_embeddings=cfg.tie_weights,
        bos_token_id=eot,
        eos_token_id=eot,
        architectures=["GPT2LMHeadModel"],
        dtype=str(dtype).removeprefix("torch."),
    )


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The weights under GPT2LMHeadModel's names, Conv1D ones transposed to (in, out).

    A tied head is left out: Hugging Face ties ``lm_head`` to ``wte`` on loading.
    """
    out = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and model.config.tie_weights:
            continue
        if key.endswith(CONV1D_WEIGHTS):
            value = value.t()
        out[key] = value.detach().cpu().contiguous()
    return out


# ---------------------------------------------------------------------------- tokenizer


def hf_vocab(tokenizer: BPETokenizer) -> dict[str, int]:
    """vocab.json: each token's bytes in GPT-2's printable alphabet -> id."""
    vocab = {readable(b): i for i, b in sorted(tokenizer.vocab.items())}
    return vocab | tokenizer.special_tokens


def hf_merges(tokenizer: BPETokenizer) -> list[tuple[str, str]]:
    """The merges as printable pairs, in the order they were learned (rank order)."""
    vocab = tokenizer.vocab
    by_rank = sorted(tokenizer.merges.items(), key=lambda kv: kv[1])
    return [(readable(vocab[a]), readable(vocab[b])) for (a, b), _ in by_rank]


def save_hf_tokenizer(
    tokenizer: BPETokenizer, out_dir: str | Path, model_max_length: int
) -> list[Path]:
    """Write the tokenizer files of a Hugging Face GPT-2 folder; returns their paths."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    out = Path(out_dir)
    vocab, merges = hf_vocab(tokenizer), hf_merges(tokenizer)
    eot = ENDOFTEXT if ENDOFTEXT in tokenizer.special_tokens else None
    specials = sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])

    # tokenizer.json: GPT-2's byte-level BPE (ByteLevel splits with GPT-2's pattern)
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=False)
    fast = Tokenizer(bpe)
    fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    fast.decoder = decoders.ByteLevel()
    fast.add_special_tokens(
        [AddedToken(s, special=True, normalized=False) for s, _ in specials]
    )
    added = {
        str(i): dict(content=s, lstrip=False, normalized=False, rstrip=False)
        | dict(single_word=False, special=True)
        for s, i in specials
    }
    special_map = dict(bos_token=eot, eos_token=eot, unk_token=eot)
    tokenizer_config = dict(
        tokenizer_class="GPT2Tokenizer",
        model_max_length=model_max_length,
        add_prefix_space=False,
        add_bos_token=False,
        clean_up_tokenization_spaces=False,
        errors="replace",  # bytes that are not UTF-8 decode to U+FFFD, as ours do
        pad_token=None,  # GPT-2 has none; batches set tokenizer.pad_token
        added_tokens_decoder=added,
    )
    tokenizer_config |= special_map
    paths = {
        name: out / name
        for name in (
            "vocab.json",
            "merges.txt",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        )
    }
    paths["vocab.json"].write_text(
        json.dumps(vocab, ensure_ascii=False), encoding="utf-8"
    )
    lines = [MERGES_HEADER] + [f"{a} {b}" for a, b in merges]
    paths["merges.txt"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    fast.save(str(paths["tokenizer.json"]))
    for name, data in [
        ("tokenizer_config.json", tokenizer_config),
        ("special_tokens_map.json", {k: v for k, v in special_map.items() if v}),
    ]:
        paths[name].write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return list(paths.values())


# ---------------------------------------------------------------------------- export


def _check_out_dir(out: Path) -> None:
    """Refuse to overwrite a course model folder (its config.json is not HF's)."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder")
    config = out / "config.json"
    if config.exists():
        try:
            hf = "model_type" in json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
            hf = False
        if not hf:
            raise ValueError(
                f"{out} holds a config.json that is not a Hugging Face config "
                "(a course model folder?): export to another folder"
            )


def export_hf(
    model: GPT,
    tokenizer: BPETokenizer,
    out_dir: str | Path,
    info: dict | None = None,
) -> Path:
    """Write ``model`` and ``tokenizer`` as a Hugging Face GPT-2 folder; returns it."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    check_exportable(model)
    check_tokenizer(tokenizer, model.config.vocab_size)
    out = Path(out_dir)
    _check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)

    config = hf_config(model, tokenizer)
    config.save_pretrained(out)
    save_file(hf_state_dict(model), out / "model.safetensors", {"format": "pt"})
    eot = config.eos_token_id
    generation = GenerationConfig(
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,  # batched generate pads finished rows with it
    )
    generation.save_pretrained(out)
    save_hf_tokenizer(tokenizer, out, model.config.context_length)
    if info is not None:
        text = json.dumps(info, indent=1, ensure_ascii=False) + "\n"
        (out / "course_info.json").write_text(text, encoding="utf-8")
    return out


def load_hf(out_dir: str | Path):
    """``(GPT2LMHeadModel in eval mode, GPT2TokenizerFast)`` from an exported folder."""
    from transformers import GPT2LMHeadModel, GPT2TokenizerFast

    model = GPT2LMHeadModel.from_pretrained(out_dir).eval()
    return model, GPT2TokenizerFast.from_pretrained(out_dir)


def export_course_model(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Export a course model folder (a LoRA adapter folder: base and adapter merged)
    as a Hugging Face GPT-2 folder, with its ``config.json`` as ``course_info.json``."""
    model, tokenizer, info = load_course_model("cpu", path=model_dir)
    if lora_layers(model):
        merge_lora(model)
        print(f"merged the LoRA adapter of {model_dir} into its base model")
    return export_hf(model, tokenizer, out_dir, info)
