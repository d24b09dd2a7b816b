"""What ``--model`` names, the same in every command line (``generate``, ``serve``,
``evaluate``, ``export``):

* a course model by name: ``base``, ``sft``, ``lora``, ``dpo`` (``shared.pretrained``);
* a course model folder: ``config.json`` + ``model.safetensors`` + tokenizer, as
  ``save_course_model`` writes and ``data/models/`` ships, or a LoRA adapter folder;
* a training checkpoint folder: a run's folder with ``latest`` or one step's folder
  (``shared.checkpoint``), such as ``runs/04_pretraining/laptop``. A checkpoint holds
  no tokenizer: it is the course BPE of the model's vocabulary size, as the course
  trains every checkpointed model;
* a Hugging Face GPT-2 folder, as ``python -m shared.export hf`` writes.

``find_model`` checks a name without loading anything, so a command refuses a bad one
before any work; ``load_model`` loads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.checkpoint import (
    LATEST,
    CheckpointError,
    checkpoint_folder,
    load_weights,
    read_json_file,
)
from shared.device import get_device
from shared.gpt2_weights import from_gpt2
from shared.model import GPT, GPTConfig
from shared.pretrained import COURSE_MODELS, MODELS_DIR, load_course_model
from shared.tokenizer import (
    GPT2_PATTERN,
    BPETokenizer,
    course_tokenizer,
    from_readable,
)

MODEL_HELP = (
    f"{', '.join(COURSE_MODELS)}, a model folder, a Hugging Face export or a "
    "training checkpoint folder"
)
HF_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # the course's tanh GELU
LAYERNORM_EPS = 1e-5  # the course's (and GPT-2's) LayerNorm epsilon


@dataclass(frozen=True)
class ModelSpec:
    """A checked ``--model``: its display name, its kind and its folder."""

    name: str  # "base", or the folder's name
    kind: str  # "course", "adapter", "checkpoint" or "hf"
    path: Path


def _kind(path: Path) -> str | None:
    """What kind of model folder ``path`` is, or None if it holds no model."""
    if (path / "adapter_config.json").exists():
        return "adapter"
    if (path / LATEST).exists() or (path / "checkpoint.json").exists():
        return "checkpoint"
    config = path / "config.json"
    if not config.exists():
        return None
    data = read_json_file(config)
    if "model_config" in data:
        return "course"
    if "model_type" in data:
        return "hf"
    raise ValueError(
        f"{config} is neither a course model's config (no 'model_config') nor a "
        "Hugging Face one (no 'model_type')"
    )


def find_model(spec: str | Path) -> ModelSpec:
    """What ``spec`` names, checked without loading weights; ``ValueError`` (or
    ``FileNotFoundError`` for a course model not trained yet) says what is accepted."""
    text = str(spec)
    if text in COURSE_MODELS:
        path = MODELS_DIR / COURSE_MODELS[text]
        kind = _kind(path) if path.is_dir() else None
        if kind is None:
            raise FileNotFoundError(
                f"the course model {text!r} is not in {path}: run chapters/"
                "04_pretraining/train_shakespeare.py (base) or chapters/"
                "07_finetuning_dpo/train_finetuned.py (sft, lora, dpo) to train it"
            )
        return ModelSpec(text, kind, path)
    path = Path(text)
    if not path.exists():
        raise ValueError(f"unknown model {text!r}: give {MODEL_HELP}")
    if not path.is_dir():
        raise ValueError(
            f"{path} is a file; --model takes a name or a folder ({MODEL_HELP}), "
            f"such as {path.parent}"
        )
    kind = _kind(path)
    if kind is None:
        runs = sorted(p.name for p in path.iterdir() if (p / LATEST).exists())
        hint = f"; its runs {runs} are checkpoint folders" if runs else ""
        raise ValueError(
            f"{path} holds no model: a course model or Hugging Face folder has "
            "config.json and model.safetensors, a LoRA adapter adapter_config.json, "
            f"a training checkpoint {LATEST} or checkpoint.json{hint}"
        )
    return ModelSpec(path.resolve().name, kind, path)


def find_models(specs: list[str]) -> list[ModelSpec]:
    """``find_model`` of each, refusing two that would share a name in a report."""
    found = [find_model(spec) for spec in specs]
    names = [model.name for model in found]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(
            f"two models are named {twice[0]!r} (a folder is named after its last "
            f"part): {[s for s, n in zip(specs, names, strict=True) if n == twice[0]]}"
        )
    return found


def load_model(
    spec: str | Path | ModelSpec, device: str | torch.device | None = None
) -> tuple[GPT, object, dict]:
    """``(model in eval mode, tokenizer, info)`` for anything ``find_model`` accepts;
    ``info`` is the model's record (its config.json, the checkpoint's metadata)."""
    found = spec if isinstance(spec, ModelSpec) else find_model(spec)
    if found.kind in ("course", "adapter"):
        return load_course_model(device, path=found.path)
    load = _load_checkpoint if found.kind == "checkpoint" else _load_hf
    model, tokenizer, info = load(found.path)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"{found.path}: the tokenizer has {tokenizer.vocab_size} ids, the model "
            f"{model.config.vocab_size}"
        )
    model.to(device if isinstance(device, torch.device) else get_device(device))
    model.eval()
    return model, tokenizer, info


def _load_checkpoint(path: Path) -> tuple[GPT, BPETokenizer, dict]:
    """The model of a training checkpoint, with the course BPE of its vocabulary."""
    folder = checkpoint_folder(path)
    remedy = f"give another checkpoint, or resume the run to save {path} again"
    meta = read_json_file(folder / "checkpoint.json", ("model_config",), None, remedy)
    meta.pop("history", None)  # the training curves: large, and not the model's
    try:
        model = GPT(GPTConfig(**meta["model_config"]))
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"{folder / 'checkpoint.json'}: 'model_config' is not a valid GPTConfig "
            f"({err}); {remedy}"
        ) from err
    load_weights(model, folder / "model.safetensors", remedy)
    vocab_size = model.config.vocab_size
    if vocab_size <= 256:
        raise CheckpointError(
            f"{folder} holds a model of {vocab_size} ids, not one of the course BPE "
            "(a character-level model?): a checkpoint saves no tokenizer, so only "
            "models of the course BPE can be loaded from one"
        )
    meta["tokenizer"] = f"course_tokenizer(vocab_size={vocab_size})"
    return model, course_tokenizer(vocab_size), meta


def _load_hf(path: Path) -> tuple[GPT, BPETokenizer, dict]:
    """A Hugging Face GPT-2 folder as the course's GPT and BPE tokenizer."""
    from safetensors.torch import load_file  # only this kind of folder needs it

    hf = read_json_file(path / "config.json")
    problems = []
    if hf.get("model_type") != "gpt2":
        problems.append(f"model_type {hf.get('model_type')!r} (not 'gpt2')")
    if hf.get("activation_function", "gelu_new") not in HF_ACTIVATIONS:
        problems.append(f"activation_function {hf['activation_function']!r}")
    if hf.get("layer_norm_epsilon", LAYERNORM_EPS) != LAYERNORM_EPS:
        problems.append(f"layer_norm_epsilon {hf['layer_norm_epsilon']}")
    if problems:
        raise ValueError(
            f"{path} holds a model the course's GPT cannot run: {'; '.join(problems)}"
        )
    try:
        config = GPTConfig(
            vocab_size=hf["vocab_size"], context_length=hf["n_positions"],
            n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
            ffn_hidden=hf.get("n_inner"),
            tie_weights=hf.get("tie_word_embeddings", True),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path / 'config.json'} is incomplete ({err!r})") from err
    weights = path / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{weights} does not exist")
    model = from_gpt2(load_file(str(weights)), config)
    info_file = path / "course_info.json"
    info = read_json_file(info_file) if info_file.exists() else {"hf_config": hf}
    return model, hf_tokenizer(path), info


def hf_tokenizer(path: str | Path) -> BPETokenizer:
    """The byte-level BPE of a Hugging Face GPT-2 folder (``vocab.json`` and
    ``merges.txt``) as the course's ``BPETokenizer``: the same ids."""
    path = Path(path)
    try:
        vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
        lines = (path / "merges.txt").read_text(encoding="utf-8").splitlines()
        pairs = [line.split(" ") for line in lines if line and line[0] != "#"]
        merges = [(vocab[a], vocab[b]) for a, b in pairs]
        by_id = {i: s for s, i in vocab.items()}
        byte_order = [from_readable(by_id[i])[0] for i in range(256)]
        first_special = 256 + len(merges)
        specials = {s: i for s, i in vocab.items() if i >= first_special}
        tokenizer = BPETokenizer(merges, specials, GPT2_PATTERN, byte_order)
        # the merges must build the vocabulary's tokens in its own id order
        wrong = [i for i in range(first_special)
                 if tokenizer.vocab[i] != from_readable(by_id[i])]  # fmt: skip
    except (OSError, KeyError, ValueError, IndexError, TypeError) as err:
        raise ValueError(
            f"{path} holds no GPT-2 byte-level BPE the course can read "
            f"({type(err).__name__}: {err})"
        ) from err
    if wrong:
        raise ValueError(
            f"{path}: merges.txt does not build vocab.json's token {wrong[0]}"
        )
    return tokenizer
