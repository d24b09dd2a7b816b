"""The course's own pretrained Shakespeare model: its recipes, its data, and a loader.

``chapters/04_pretraining/train_shakespeare.py`` trains the laptop recipe and ships it
in ``data/models/shakespeare-laptop/`` (weights, tokenizer, config + measured results);
``load_course_model()`` is how chapter 00 and chapters 07-09 start from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shared.checkpoint import load_weights
from shared.data import REPO_ROOT
from shared.model import GPT, GPTConfig
from shared.train import TrainConfig

LAPTOP_MODEL_DIR = REPO_ROOT / "data" / "models" / "shakespeare-laptop"
# nanoGPT's Shakespeare results as its README states them (github.com/karpathy/nanoGPT,
# "quick start", character level). The README gives the validation loss in nats per
# character; the token counts follow from the command lines it prints. Nothing here was
# measured by this course (chapter 4 measures the same CPU configuration with our loop).
NANOGPT_CPU = {  # "--max_iters=2000 ... --batch_size=12 --block_size=64", 4 x 128
    "params": 0.80e6,  # what that configuration builds (no position table), counted
    "tokens": 2000 * 12 * 64,
    "val_loss_nats_per_char": 1.88,  # "gets us a loss of only 1.88" = 2.71 bits/char
    "wall_s": 180,  # "runs in about ~3 minutes"
}
NANOGPT_GPU = {  # config/train_shakespeare_char.py: 6 x 384, context 256, one A100
    "val_loss_nats_per_char": 1.4697,  # "the best validation loss is 1.4697"
    "wall_s": 180,  # "takes about 3 minutes"
}
NANOGPT_CPU_BPC = NANOGPT_CPU["val_loss_nats_per_char"] / math.log(2)


@dataclass
class Recipe:
    """What to train: tokenizer vocabulary, model shape and training settings."""

    vocab_size: int
    model: GPTConfig
    train: TrainConfig


def recipe(name: str = "laptop") -> Recipe:
    """The course's Shakespeare recipes: "laptop" (2 CPU cores, minutes) or "gpu"."""
    if name == "laptop":
        return Recipe(
            vocab_size=1024,
            model=GPTConfig(
                vocab_size=1024, context_length=128, n_layer=4, n_head=6, n_embd=192
            ),
            train=TrainConfig(
                max_steps=2400, batch_size=8, lr=2e-3, min_lr=2e-4, warmup_steps=100,
                weight_decay=0.1, betas=(0.9, 0.99), grad_clip=1.0, eval_interval=100,
                eval_iters=8, seed=1337,
            ),
        )  # fmt: skip
    if name == "gpu":
        # nanoGPT's Shakespeare GPU shape (6 x 384, context 256, ~10M parameters) on
        # the course BPE; dropout because 10M parameters can memorise 1M characters
        return Recipe(
            vocab_size=1024,
            model=GPTConfig(
                vocab_size=1024, context_length=256, n_layer=6, n_head=6, n_embd=384,
                dropout=0.2,
            ),
            train=TrainConfig(
                max_steps=5000, batch_size=64, lr=1e-3, min_lr=1e-4, warmup_steps=100,
                weight_decay=0.1, betas=(0.9, 0.99), grad_clip=1.0, eval_interval=250,
                eval_iters=50, dtype="bfloat16", seed=1337,
            ),
        )  # fmt: skip
    raise ValueError(f"unknown recipe {name!r}; choose 'laptop' or 'gpu'")


@dataclass
class FinetuneRecipe:
    """Chapter 07's settings: full SFT, LoRA on the same data, DPO after SFT."""

    sft: TrainConfig
    lora: TrainConfig
    lora_r: int
    lora_alpha: float
    lora_targets: tuple[str, ...]
    dpo: TrainConfig
    beta: float
    dpo_sft_weight: float  # the NLL term on chosen answers (0: plain DPO)


def finetune_recipe(name: str = "laptop") -> FinetuneRecipe:
    """The fine-tuning recipes behind the shipped SFT, LoRA and DPO models."""
    if name != "laptop":
        raise ValueError(f"unknown fine-tuning recipe {name!r}; choose 'laptop'")
    sft = TrainConfig(
        max_steps=2000, batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=50,
        weight_decay=0.0, eval_interval=250, log_interval=50, seed=0,
    )  # fmt: skip
    # LoRA trains 4% of the weights: a larger learning rate, the same steps and data
    lora = dataclasses.replace(sft, lr=5e-3, min_lr=5e-4)
    dpo = TrainConfig(
        max_steps=400, batch_size=16, lr=2e-4, min_lr=2e-5, warmup_steps=20,
        weight_decay=0.0, eval_interval=50, log_interval=10, seed=0,
    )  # fmt: skip
    targets = ("c_attn", "c_proj", "c_fc")
    return FinetuneRecipe(
        sft, lora, 16, 32.0, targets, dpo, beta=0.1, dpo_sft_weight=1.0
    )


def shakespeare_splits(tokenizer) -> dict:
    """Tiny Shakespeare split by character position (last 10% validates), encoded.

    Returns ``train_ids``, ``val_ids`` (int64 arrays) and the character counts, so a
    per-token loss converts to bits per character.
    """
    from shared.data import read_text
    from shared.dataset import token_ids_cached, train_val_split

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
    from shared.device import get_device
    from shared.tokenizer import BPETokenizer

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
    from shared.lora import load_peft_adapter

    info = json.loads((path / "course.json").read_text())
    model, tokenizer, _ = load_course_model(device, path=path / info["base"])
    load_peft_adapter(model, path)  # adapters are made on the base weights' device
    model.eval()
    return model, tokenizer, info


def save_course_model(model: GPT, tokenizer, folder: str | Path, info: dict) -> Path:
    """Write ``model.safetensors``, ``tokenizer.json`` and ``config.json`` (``info``
    with the model's config added) so ``load_course_model(path=folder)`` loads it."""
    from safetensors.torch import save_model

    from shared.checkpoint import config_dict

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
