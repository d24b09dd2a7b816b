"""The course's shipped Shakespeare models: where they live and how to load them.

``chapters/04_pretraining/train_shakespeare.py`` trains the laptop recipe
(``shared.recipes``) and ships it in ``data/models/shakespeare-laptop/`` (weights,
tokenizer, config + measured results); chapter 07 ships the fine-tuned ones beside it.
``load_course_model()`` is how chapter 00 and chapters 07-09 start from them.
Importing this module loads the model and tokenizer layers only (no training code).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.checkpoint import config_dict, load_weights
from shared.data import REPO_ROOT, read_text
from shared.dataset import token_ids_cached, train_val_split
from shared.device import get_device
from shared.model import GPT, GPTConfig
from shared.tokenizer import BPETokenizer

LAPTOP_MODEL_DIR = REPO_ROOT / "data" / "models" / "shakespeare-laptop"


def shakespeare_splits(tokenizer) -> dict:
    """Tiny Shakespeare split by character position (last 10% validates), encoded.

    Returns ``train_ids``, ``val_ids`` (int64 arrays) and the character counts, so a
    per-token loss converts to bits per character.
    """
    text = read_text("tinyshakespeare")
    train_text, val_text = train_val_split(text, 0.1)
    return {
        "train_ids": token_ids_cached(tokenizer, train_text, "tinyshakespeare-train"),
        "val_ids": token_ids_cached(tokenizer, val_text, "tinyshakespeare-val"),
        "train_chars": len(train_text),
        "val_chars": len(val_text),
    }


MODELS_DIR = REPO_ROOT / "data" / "models"
# the models the course ships: chapter 04 pretrains "base", chapter 07 fine-tunes it
COURSE_MODELS = {
    "base": "shakespeare-laptop",
    "sft": "shakespeare-sft",  # full supervised fine-tuning on the instruction tasks
    "lora": "shakespeare-lora",  # a LoRA adapter (PEFT format) on "base"
    "dpo": "shakespeare-dpo",  # "sft" after DPO on the preference pairs
}


def load_course_model(
    device: str | torch.device | None = None,
    path: str | Path | None = None,
    name: str = "base",
) -> tuple[GPT, object, dict]:
    """A shipped course model: ``(model in eval mode, tokenizer, info)``.

    ``name`` is one of ``COURSE_MODELS`` ("base", "sft", "lora", "dpo"); ``path``
    overrides the folder. ``info`` is its ``config.json`` (``course.json`` for the
    LoRA adapter): model and training config plus the measured results. The LoRA
    model comes back with its adapter unmerged (``shared.lora.merge_lora`` folds it).
    """
    if name not in COURSE_MODELS:
        raise ValueError(f"unknown course model {name!r}; one of {list(COURSE_MODELS)}")
    path = Path(path) if path is not None else MODELS_DIR / COURSE_MODELS[name]
    if (path / "adapter_config.json").exists():
        return _load_adapter_model(path, device)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"no course model at {path}: run chapters/04_pretraining/"
            "train_shakespeare.py (base) or chapters/07_finetuning_dpo/"
            "train_finetuned.py (sft, lora, dpo) to train it"
        )
    info = json.loads((path / "config.json").read_text())
    model = GPT(GPTConfig(**info["model_config"]))
    remedy = (
        "restore the shipped file (`git checkout -- data/models`) or retrain it with "
        "chapters/04_pretraining/train_shakespeare.py"
    )
    load_weights(model, path / "model.safetensors", remedy)
    tokenizer = BPETokenizer.load(path / info["tokenizer_file"])
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} ids, model {model.config.vocab_size}"
        )
    model.to(get_device(device) if not isinstance(device, torch.device) else device)
    model.eval()
    return model, tokenizer, info


def _load_adapter_model(path: Path, device) -> tuple[GPT, object, dict]:
    from shared.lora import load_peft_adapter  # post-training layer: only for adapters

    info = json.loads((path / "course.json").read_text())
    model, tokenizer, _ = load_course_model(device, path=path / info["base"])
    load_peft_adapter(model, path)  # adapters are made on the base weights' device
    model.eval()
    return model, tokenizer, info


def save_course_model(model: GPT, tokenizer, folder: str | Path, info: dict) -> Path:
    """Write ``model.safetensors``, ``tokenizer.json`` and ``config.json`` (``info``
    with the model's config added) so ``load_course_model(path=folder)`` loads it."""
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, str(folder / "model.safetensors"))
    tokenizer.save(folder / "tokenizer.json")
    info = {**info, "tokenizer_file": "tokenizer.json",
            "model_config": config_dict(model.config)}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(info, indent=1) + "\n")
    return folder


def as_ids(array) -> np.ndarray:
    """Token ids as int64 (cached ids are uint16 to save space)."""
    return np.asarray(array, dtype=np.int64)


def load_model(spec: str, device: str | None = None) -> tuple[nn.Module, object]:
    """``(model, tokenizer)``: a course model by name ("base", "sft", ...) or folder."""
    if spec in COURSE_MODELS:
        model, tokenizer, _ = load_course_model(device, name=spec)
    elif Path(spec).is_dir():
        model, tokenizer, _ = load_course_model(device, path=spec)
    else:
        raise ValueError(
            f"unknown model {spec!r}: give one of {list(COURSE_MODELS)} or a model "
            "folder (config.json + model.safetensors, or a LoRA adapter)"
        )
    return model, tokenizer
