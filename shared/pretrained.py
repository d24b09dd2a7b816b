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

from shared.checkpoint import (
    CheckpointError,
    check_config_fields,
    config_dict,
    load_weights,
    read_json_file,
)
from shared.data import REPO_ROOT, atomic_files, read_text, sha256sum
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
# models that serve another rather than the reader, kept out of COURSE_MODELS (the
# four that evaluation and export mean): chapter 09's draft for speculative decoding
HELPER_MODELS = {"draft": "shakespeare-draft"}


def load_course_model(
    device: str | torch.device | None = None,
    path: str | Path | None = None,
    name: str = "base",
) -> tuple[GPT, object, dict]:
    """A shipped course model: ``(model in eval mode, tokenizer, info)``.

    ``name`` is one of ``COURSE_MODELS`` ("base", "sft", "lora", "dpo") or "draft"
    (chapter 09's draft model for speculative decoding of "base"); ``path``
    overrides the folder. ``info`` is its ``config.json`` (``course.json`` for the
    LoRA adapter): model and training config plus the measured results. The LoRA
    model comes back with its adapter unmerged (``shared.lora.merge_lora`` folds it).
    """
    folders = COURSE_MODELS | HELPER_MODELS
    if name not in folders:
        raise ValueError(f"unknown course model {name!r}; one of {list(folders)}")
    path = Path(path) if path is not None else MODELS_DIR / folders[name]
    if (path / "adapter_config.json").exists():
        return _load_adapter_model(path, device)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"no course model at {path}: run chapters/04_pretraining/"
            "train_shakespeare.py (base), chapters/07_finetuning_dpo/"
            "train_finetuned.py (sft, lora, dpo) or chapters/09_inference/"
            "train_draft.py (draft) to train it"
        )
    remedy = (
        "restore the shipped files (`git checkout -- data/models`) or retrain the "
        "model (chapters/04_pretraining/train_shakespeare.py for the base, "
        "chapters/07_finetuning_dpo/train_finetuned.py for the fine-tuned ones, "
        "chapters/09_inference/train_draft.py for the draft)"
    )
    config_file = path / "config.json"
    info = read_json_file(config_file, ("model_config", "tokenizer_file"), None, remedy)
    check_config_fields(info["model_config"], GPTConfig, config_file, "model_config")
    try:
        model = GPT(GPTConfig(**info["model_config"]))
    except (TypeError, ValueError) as err:
        what = f"{config_file}: 'model_config' is not a valid GPTConfig ({err})"
        raise CheckpointError(f"{what}; {remedy}") from err
    weights = path / "model.safetensors"
    load_weights(model, weights, remedy, str(config_file))
    what = f"the file {config_file} describes (its 'weights_sha256')"
    check_weights(weights, info.get("weights_sha256"), what, remedy)
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

    info = read_json_file(path / "course.json", ("base",))
    base = path / info["base"]
    check_weights(
        base / "model.safetensors",
        info.get("base_weights_sha256"),
        f"the base model the LoRA adapter {path} was trained on (course.json's "
        "'base_weights_sha256'), so the adapter would run on another model",
        "restore that base (`git checkout -- data/models`) or retrain the adapter "
        "with chapters/07_finetuning_dpo/train_finetuned.py lora",
    )
    model, tokenizer, _ = load_course_model(device, path=base)
    load_peft_adapter(model, path)  # adapters are made on the base weights' device
    model.eval()
    return model, tokenizer, info


def weights_sha256(folder: str | Path) -> str:
    """SHA-256 of a model folder's ``model.safetensors`` (``sha256sum`` gives it too):
    how a fine-tuned model or an adapter records the base it was trained on."""
    return sha256sum(Path(folder) / "model.safetensors")


def check_weights(file: Path, expected: str | None, what: str, remedy: str) -> None:
    """Raise CheckpointError unless ``file`` hashes to ``expected`` (None: unknown)."""
    if expected is None or not file.exists():
        return  # written before hashes were recorded; a missing file is named later
    actual = sha256sum(file)
    if actual != expected:
        raise CheckpointError(
            f"{file} is not {what}: its SHA-256 is {actual}, expected {expected} "
            f"(the files come from different training runs); {remedy}"
        )


def save_course_model(model: GPT, tokenizer, folder: str | Path, info: dict) -> Path:
    """Write ``model.safetensors``, ``tokenizer.json`` and ``config.json`` (``info``
    with the model's config and ``weights_sha256`` added) so
    ``load_course_model(path=folder)`` loads it.

    All three files are replaced together or not at all (``atomic_files``): a full
    disk or a crash leaves the folder's earlier model as it was.
    """
    from safetensors.torch import save_model

    with atomic_files(folder) as part:
        weights = part("model.safetensors")
        save_model(model, str(weights))
        part("tokenizer.json").write_text(tokenizer.to_json(), encoding="utf-8")
        info = {**info, "tokenizer_file": "tokenizer.json",
                "model_config": config_dict(model.config),
                "weights_sha256": sha256sum(weights)}  # fmt: skip
        part("config.json").write_text(json.dumps(info, indent=1) + "\n")
    return Path(folder)


def as_ids(array) -> np.ndarray:
    """Token ids as int64 (cached ids are uint16 to save space)."""
    return np.asarray(array, dtype=np.int64)
