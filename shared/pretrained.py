"""The course's own pretrained Shakespeare model: its recipes, its data, and a loader.

``chapters/04_pretraining/train_shakespeare.py`` trains the laptop recipe and ships it
in ``data/models/shakespeare-laptop/`` (weights, tokenizer, config + measured results);
``load_course_model()`` is how chapter 00 and chapters 07-09 start from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shared.checkpoint import load_weights
from shared.data import REPO_ROOT
from shared.model import GPT, GPTConfig
from shared.train import TrainConfig

LAPTOP_MODEL_DIR = REPO_ROOT / "data" / "models" / "shakespeare-laptop"
NANOGPT_CPU = {  # nanoGPT's documented CPU run (README, shakespeare_char)
    "params": 0.80e6,
    "tokens": 2000 * 12 * 64,
    "val_loss_nats_per_char": 1.886,  # = 2.72 bits/char
    "wall_s": 104,
}


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


def load_course_model(
    device: str | torch.device | None = None, path: str | Path | None = None
) -> tuple[GPT, object, dict]:
    """The shipped laptop model: ``(model in eval mode, tokenizer, info)``.

    ``info`` is its ``config.json``: model and training config plus the measured
    results (validation bits/char, tokens, FLOPs, wall time, machine).
    """
    from shared.device import get_device
    from shared.tokenizer import BPETokenizer

    path = Path(path) if path is not None else LAPTOP_MODEL_DIR
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"no course model at {path}: run chapters/04_pretraining/"
            "train_shakespeare.py to train it"
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


def as_ids(array) -> np.ndarray:
    """Token ids as int64 (cached ids are uint16 to save space)."""
    return np.asarray(array, dtype=np.int64)
