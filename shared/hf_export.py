"""Export a course GPT and its tokenizer as a Hugging Face GPT-2 (or Llama) folder.

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

A Llama-style model (``GPTConfig(norm="rmsnorm", ffn="swiglu", pos_encoding="rope",
bias=False)``) is written as a ``LlamaForCausalLM`` folder instead: the same files,
with ``shared.llama_export``'s config and weights.

A tokenizer with the chat tokens (``shared.chat.with_chat_tokens``) also gets the
course's ``chat_template`` in ``tokenizer_config.json``, so ``apply_chat_template``
gives ``shared.chat.encode_chat``'s ids, and ``generate`` stops at ``<|end|>`` too.

From the command line: ``python -m shared.export hf OUT_DIR [--model NAME_OR_DIR]
[--overwrite]`` (``export_course_model``: any model ``--model`` names, a LoRA adapter
merged into its base).

Nothing is lost: ``OUT_DIR`` may be new, empty, or an earlier export of the same
model, that is, only an export's files and either the same weights (re-running an
export is harmless) or a ``course_info.json`` that records an export of the same
course model (its ``name``, e.g. ``shakespeare-laptop``, retrained since) whose
``model.safetensors`` nobody has changed since. Any other folder (another model, a
tokenizer's own ``vocab.json``, another model's export, weights trained further in
Hugging Face) is refused, naming what is there, unless ``--overwrite``; then the
export replaces the files of the same name and deletes the folder's other files
(subfolders are kept), but only once every new file is complete. A course model
folder is never overwritten. The files are written to temporary names, flushed to
the disk and renamed, so a full disk leaves the folder as it was.

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

import contextlib
import hashlib
import json
import tempfile
from collections import Counter
from pathlib import Path

import torch

from shared.chat import CHAT_TEMPLATE, END, has_chat_tokens
from shared.data import sha256sum, write_files
from shared.gpt2_weights import CONV1D_WEIGHTS
from shared.llama_export import is_llama_style, llama_config, llama_state_dict
from shared.lora import lora_layers, merge_lora
from shared.model import GPT
from shared.model_spec import ModelSpec, load_model
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
            "tie_weights=False is fine. Llama-style models (norm='rmsnorm', "
            "ffn='swiglu', pos_encoding='rope', bias=False) export to Llama."
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
    """The ``transformers.GPT2Config`` of ``model`` (bos = <|endoftext|>; eos the
    same, or ``<|end|>`` for a chat tokenizer, as its ``eos_token``)."""
    from transformers import GPT2Config

    cfg = model.config
    eot = tokenizer.special_tokens.get(ENDOFTEXT)
    eos = tokenizer.special_tokens.get(END, eot)
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
        eos_token_id=eos,
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
    return write_files(out_dir, hf_tokenizer_files(tokenizer, model_max_length))


def hf_tokenizer_files(
    tokenizer: BPETokenizer, model_max_length: int
) -> dict[str, str]:
    """The tokenizer files of a Hugging Face GPT-2 folder: ``{name: text}``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

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
    # a chat model's answer ends with <|end|>: trainers that append eos_token to a
    # response (TRL) then build the sequences the course trains on
    end = END if has_chat_tokens(tokenizer) else eot
    special_map = dict(bos_token=eot, eos_token=end, unk_token=eot)
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
    if has_chat_tokens(tokenizer):  # the format travels with the model
        tokenizer_config["chat_template"] = CHAT_TEMPLATE
    special_tokens_map = {k: v for k, v in special_map.items() if v}
    lines = [MERGES_HEADER] + [f"{a} {b}" for a, b in merges]
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "\n".join(lines) + "\n",
        "tokenizer.json": fast.to_str(pretty=True),  # as Tokenizer.save writes it
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special_tokens_map, indent=2) + "\n",
    }


# ---------------------------------------------------------------------------- export


# every file an export writes (course_info.json only when there is information)
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors",
                "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "course_info.json")  # fmt: skip


def _is_course_model_folder(out: Path) -> bool:
    """A course model folder (data/models/*): config.json without HF's model_type."""
    config = out / "config.json"
    if not config.exists():
        return False
    try:
        return "model_type" not in json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
        return True  # not Hugging Face's either: never overwritten


def _describe(out: Path, present: list[str]) -> str:
    """What a folder holds, for an error message: its files and what they look like."""
    names = [n + "/" * (out / n).is_dir() for n in present]
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" * (len(names) > 10))
    with contextlib.suppress(OSError, ValueError, LookupError, AttributeError):
        config = json.loads((out / "config.json").read_text())
        model_type = config.get("model_type", "?")
        shown += f" (a Hugging Face {model_type} model"
        shown += (
            f", {config['architectures'][0]})" if config.get("architectures") else ")"
        )
    return shown


def _earlier_export(out: Path, name) -> bool:
    """Was ``out`` written by an export of the model called ``name``, and is its
    ``model.safetensors`` still the one that export wrote?"""
    try:
        info = json.loads((out / "course_info.json").read_text(encoding="utf-8"))
        record = info.get("hf_export") or {}
        return (
            bool(name)
            and record.get("name") == name
            and record.get("model_sha256") == sha256sum(out / "model.safetensors")
        )
    except (OSError, ValueError, AttributeError):
        return False


def check_out_dir(
    out: Path, weights: bytes, overwrite: bool = False, name: str | None = None
) -> list[Path]:
    """Refuse to write an export into ``out`` where that would lose anything.

    ``out`` may be missing, empty, or hold an earlier export of the same model:
    only files an export writes, and either its ``model.safetensors`` byte for
    byte the one about to be written (``weights``), or its ``course_info.json``
    recording an export of the model called ``name`` whose ``model.safetensors``
    is unchanged since (the model was retrained and is exported again). Anything
    else (another model, a tokenizer's own files, another model's export, weights
    changed after the export) needs ``overwrite``; a course model folder is never
    overwritten. Returns the files that ``overwrite`` will delete: those that are
    not part of the export (subfolders are left alone).
    """
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder")
    if _is_course_model_folder(out):
        raise ValueError(
            f"{out} holds a config.json that is not a Hugging Face config "
            "(a course model folder?): export to another folder"
        )
    if not out.exists():
        return []
    present = sorted(p.name for p in out.iterdir() if not p.name.startswith(".part-"))
    if not present:
        return []
    others = [n for n in present if n not in EXPORT_FILES]
    old = out / "model.safetensors"
    same = old.is_file() and sha256sum(old) == hashlib.sha256(weights).hexdigest()
    if (same or _earlier_export(out, name)) and not others:
        return []  # an earlier export of the same model: nothing is lost
    if overwrite:
        return [out / n for n in others if (out / n).is_file()]
    why = [f"files an export does not write: {', '.join(others)}"] if others else []
    if old.exists() and not same:
        why.append("its model.safetensors holds other weights")
    raise FileExistsError(
        f"{out} is not empty and is not an earlier export of this model: it holds "
        f"{_describe(out, present)}; {'; '.join(why or ['no model.safetensors'])}. "
        "Nothing was written. Export to another folder, or overwrite it "
        "(--overwrite on the command line, overwrite=True in Python): the export "
        "replaces the files of the same name and deletes its other files "
        "(subfolders are kept)."
    )


def export_hf(
    model: GPT,
    tokenizer: BPETokenizer,
    out_dir: str | Path,
    info: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` and ``tokenizer`` as a Hugging Face GPT-2 folder, or a Llama
    folder for a Llama-style model (``shared.llama_export``); returns it.

    All files are written to temporary names, flushed to the disk and then renamed
    (``shared.data.write_files``): a full disk or a crash leaves ``out_dir`` as it
    was. A folder that holds anything but an earlier export of the same model is
    refused unless ``overwrite`` (``check_out_dir``). ``course_info.json`` (written
    when ``info`` is given) records the export: ``info["name"]`` and the SHA-256 of
    the ``model.safetensors`` written.
    """
    from safetensors.torch import save
    from transformers import GenerationConfig

    llama = isinstance(model, GPT) and is_llama_style(model.config)
    if not llama:
        check_exportable(model)
    check_tokenizer(tokenizer, model.config.vocab_size)
    out = Path(out_dir)
    state = llama_state_dict(model) if llama else hf_state_dict(model)
    weights = save(state, {"format": "pt"})
    name = (info or {}).get("name")
    stale = check_out_dir(out, weights, overwrite, name)

    config = (llama_config if llama else hf_config)(model, tokenizer)
    eot = config.bos_token_id
    # a chat model ends its turn with <|end|>: generate stops there too
    stops = [i for i in (eot, tokenizer.special_tokens.get(END)) if i is not None]
    generation = GenerationConfig(
        bos_token_id=eot,
        eos_token_id=stops[0] if len(stops) == 1 else stops or None,
        pad_token_id=eot,  # batched generate pads finished rows with it
    )
    files: dict[str, bytes | str] = {}
    with tempfile.TemporaryDirectory() as scratch:  # Hugging Face writes folders
        config.save_pretrained(scratch)
        generation.save_pretrained(scratch)
        for file in ("config.json", "generation_config.json"):
            files[file] = (Path(scratch) / file).read_bytes()
    files["model.safetensors"] = weights
    files |= hf_tokenizer_files(tokenizer, model.config.context_length)
    if info is not None:
        record = {"name": name, "model_sha256": hashlib.sha256(weights).hexdigest()}
        info = {**info, "hf_export": record}
        files["course_info.json"] = (
            json.dumps(info, indent=1, ensure_ascii=False) + "\n"
        )
    write_files(out, files)
    for path in stale:  # only now that the export is complete
        path.unlink()
    return out


def load_hf(out_dir: str | Path):
    """``(GPT2LMHeadModel in eval mode, GPT2TokenizerFast)`` from an exported folder."""
    from transformers import GPT2LMHeadModel, GPT2TokenizerFast

    model = GPT2LMHeadModel.from_pretrained(out_dir).eval()
    return model, GPT2TokenizerFast.from_pretrained(out_dir)


def export_course_model(
    model_dir: str | Path | ModelSpec, out_dir: str | Path, overwrite: bool = False
) -> Path:
    """Export a course model (anything ``--model`` names, ``shared.model_spec``; a
    LoRA adapter: base and adapter merged) as a Hugging Face GPT-2 folder (Llama for
    a Llama-style model), its ``config.json`` as ``course_info.json``; ``overwrite``
    as in ``export_hf``."""
    model, tokenizer, info = load_model(model_dir, "cpu")
    if lora_layers(model):
        merge_lora(model)
        print(f"merged the LoRA adapter of {model_dir} into its base model")
    return export_hf(model, tokenizer, out_dir, info, overwrite)
