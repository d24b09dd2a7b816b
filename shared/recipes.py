"""The course's recipes: what chapter 4 pretrains (``recipe``) and chapter 7
fine-tunes (``finetune_recipe``), and nanoGPT's published Shakespeare results, the
baseline chapter 4 measures itself against."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from shared.model import GPTConfig
from shared.train import TrainConfig

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
    replay_weight: float = 0.5  # share of the loss on replayed play text (0: none)
    replay_windows: int = 8  # play windows (x context length) beside each batch
    max_turns: int = 3  # SFT conversations hold 1 to max_turns exchanges (chat)
    grpo: TrainConfig | None = None  # batch_size = prompts per step
    grpo_group: int = 8  # answers sampled per prompt
    grpo_beta: float = 0.04  # KL penalty to the reference (the SFT model)
    grpo_max_new_tokens: int = 24  # the longest answer is 19 tokens


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
    grpo = TrainConfig(
        max_steps=300, batch_size=4, lr=1e-4, min_lr=1e-5, warmup_steps=10,
        weight_decay=0.0, eval_interval=50, log_interval=10, seed=0,
    )  # fmt: skip
    targets = ("c_attn", "c_proj", "c_fc")
    return FinetuneRecipe(
        sft, lora, 16, 32.0, targets, dpo, beta=0.1, dpo_sft_weight=1.0, grpo=grpo
    )
