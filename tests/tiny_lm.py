"""A tiny stand-in language model and data for fast tests of the training code."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.train import TrainConfig

V, T = 37, 16


@dataclass
class TinyConfig:
    vocab_size: int = V
    context_length: int = T
    n_embd: int = 24
    dropout: float = 0.1


class TinyLM(nn.Module):
    """Embedding -> causal mixing MLP -> LayerNorm -> tied head, with dropout (so the
    global RNG matters for exact resume)."""

    def __init__(self, config: TinyConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.context_length, config.n_embd)
        self.mix = nn.Linear(config.n_embd, config.n_embd)
        self.ln = nn.LayerNorm(config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.head.weight = self.wte.weight  # tied, like GPT-2
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.02)

    def forward(self, idx, targets=None):
        t = idx.shape[1]
        h = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        # causal running mean: position t sees tokens 0..t only
        ctx = h.cumsum(1) / torch.arange(1, t + 1, device=idx.device)[None, :, None]
        h = h + ctx
        h = h + self.drop(F.gelu(self.mix(h)))
        logits = self.head(self.ln(h))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


def make_data(n: int = 3000, seed: int = 0) -> np.ndarray:
    # a learnable stream: mostly "repeat the previous token", sometimes a random one
    rng = np.random.default_rng(seed)
    out = np.empty(n, dtype=np.int64)
    out[0] = 0
    for i in range(1, n):
        out[i] = out[i - 1] if rng.random() < 0.8 else rng.integers(V)
    return out


def make_model(seed: int = 0, **kw) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(TinyConfig(**kw))


def make_cfg(**kw) -> TrainConfig:
    base = dict(
        max_steps=20, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=3,
        eval_interval=5, eval_iters=2, log_interval=5, seed=7,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)
