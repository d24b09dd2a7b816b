"""Training throughput at nanoGPT's CPU model size: our loop vs a naive reference loop.

Both train the same shape (char-level Tiny Shakespeare, 4 layers, 4 heads, 128 wide,
context 64, batch 12, dropout 0), interleaved in rounds in one process, so machine
load hits both alike; we print medians and the ratio.

- ours: ``shared.model.GPT`` (fused ``scaled_dot_product_attention``) trained by
  ``shared.train.train`` (AdamW groups, LR schedule, clipping, logging: the real loop).
- naive: nanoGPT-style model written out here (explicit ``q @ k^T``, mask, softmax,
  ``@ v``; no fused kernels) and a plain loop (``torch.stack`` batches, AdamW, clip).

Run: python chapters/04_pretraining/bench_train.py [--rounds 5] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.data import read_text
from shared.dataset import train_val_split
from shared.model import GPT, GPTConfig
from shared.tokenizer import CharTokenizer
from shared.train import TrainConfig, train

NANOGPT = dict(n_layer=4, n_head=4, n_embd=128, context_length=64, dropout=0.0)
BATCH = 12


# ----------------------------------------------------------------- naive reference


class NaiveAttention(nn.Module):
    """nanoGPT's attention without flash: explicit scores, mask, softmax."""

    def __init__(self, d: int, n_head: int, t: int):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.register_buffer("mask", torch.tril(torch.ones(t, t)).view(1, 1, t, t))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (z.view(B, T, self.n_head, -1).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.mask[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class NaiveBlock(nn.Module):
    def __init__(self, d: int, n_head: int, t: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = NaiveAttention(d, n_head, t)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NaiveGPT(nn.Module):
    def __init__(self, vocab: int, d: int, n_layer: int, n_head: int, t: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(t, d)
        self.blocks = nn.ModuleList(NaiveBlock(d, n_head, t) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return logits, F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.view(-1)
        )


def naive_steps(model, opt, data: torch.Tensor, steps: int, t: int) -> float:
    """nanoGPT's plain loop; returns seconds for ``steps`` optimizer steps."""
    t0 = time.perf_counter()
    for _ in range(steps):
        ix = torch.randint(len(data) - t, (BATCH,))
        x = torch.stack([data[i : i + t] for i in ix])
        y = torch.stack([data[i + 1 : i + 1 + t] for i in ix])
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per round")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    text = read_text("tinyshakespeare")
    tok = CharTokenizer(text)
    train_text, val_text = train_val_split(text)
    train_ids = np.array(tok.encode(train_text), dtype=np.int64)
    val_ids = np.array(tok.encode(val_text), dtype=np.int64)
    t = NANOGPT["context_length"]

    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=tok.vocab_size, **NANOGPT))
    naive = NaiveGPT(tok.vocab_size, 128, 4, 4, t)
    n_ours = ours.num_parameters() - ours.transformer.wpe.weight.numel()
    n_naive = sum(p.numel() for p in naive.parameters()) - naive.wpe.weight.numel()
    opt = torch.optim.AdamW(naive.parameters(), lr=1e-3)
    data = torch.as_tensor(train_ids)
    tokens = args.steps * BATCH * t

    ours_tps, naive_tps = [], []
    naive_steps(naive, opt, data, 3, t)  # warm-up both
    cfg = TrainConfig(
        max_steps=args.steps, batch_size=BATCH, lr=1e-3, warmup_steps=10,
        eval_interval=10**9, eval_iters=1, log_interval=10,
    )  # fmt: skip
    for r in range(args.rounds):
        cfg.seed = r
        hist = train(ours, train_ids, val_ids, cfg, progress=False)
        ours_tps.append(tokens / hist["elapsed_s"])
        naive_tps.append(tokens / naive_steps(naive, opt, data, args.steps, t))
        print(f"round {r}: ours {ours_tps[-1]:,.0f} tok/s, naive {naive_tps[-1]:,.0f}")
    res = {
        "model": NANOGPT | {"batch_size": BATCH, "vocab_size": tok.vocab_size},
        "params_ours_no_wpe": n_ours,
        "params_naive_no_wpe": n_naive,
        "torch_threads": torch.get_num_threads(),
        "ours_tokens_per_s": statistics.median(ours_tps),
        "naive_tokens_per_s": statistics.median(naive_tps),
    }
    res["ratio"] = res["ours_tokens_per_s"] / res["naive_tokens_per_s"]
    print(
        f"params (no position table): ours {n_ours:,}, naive {n_naive:,}; "
        f"torch threads {res['torch_threads']}\n"
        f"median tokens/s over {args.rounds} rounds of {args.steps} steps: "
        f"ours {res['ours_tokens_per_s']:,.0f}, naive {res['naive_tokens_per_s']:,.0f}"
        f"\nratio ours / naive = {res['ratio']:.2f}x"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
