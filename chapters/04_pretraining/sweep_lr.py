"""The learning-rate sweep of chapter 4, section 4.7: several seeds per peak rate.

  OMP_NUM_THREADS=1 python chapters/04_pretraining/sweep_lr.py

Trains nanoGPT's CPU model shape (4 layers, 4 heads, 128 wide, context 64, batch 12)
on the course BPE with the chapter's loop (``shared.train.train``: AdamW groups,
warmup + cosine to a tenth of the peak, clipping at 1.0) and nanoGPT's other
settings, for ``--steps`` steps at every peak learning rate in ``--lrs`` and every
seed in ``--seeds`` (the seed fixes both the initial weights and the batch order).
One thread (``--threads``), one run after another. Writes ``results/lr_sweep.json``:
per run the training loss every step (averaged over ``--bin`` steps), the evaluation
curve, the final validation loss over the whole split, whether it diverged, and the
wall and CPU time; plus the machine and the totals (on a shared machine the CPU time
says what the sweep costs on a core of its own). A run *diverged* when its training
loss became non-finite or rose above the loss of a uniform guess, ln V, at any step
after the first ``--bin`` steps: worse than knowing nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from train_shakespeare import machine, nanogpt_train_config

from shared.data import write_files
from shared.device import seed_everything
from shared.loss import bits_per_char, evaluate_split
from shared.model import GPT, GPTConfig
from shared.pretrained import as_ids, shakespeare_splits
from shared.tokenizer import course_tokenizer
from shared.train import train

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
SEEDS = (0, 1, 2)
STEPS = 400


def finite_or_none(x: float) -> float | None:
    """JSON has no NaN or infinity: a diverged number is stored as null."""
    return float(x) if math.isfinite(x) else None


def is_diverged(losses, ln_v: float, skip: int) -> bool:
    """A non-finite loss anywhere, or one above ln V (a uniform guess) after ``skip``
    steps (the first steps of an untrained model sit at ln V by chance)."""
    losses = np.asarray(losses, dtype=float)
    later = losses[skip:]
    return bool(not np.isfinite(losses).all() or (later.size and later.max() > ln_v))


def sweep_run(
    data: dict,
    lr: float,
    seed: int,
    steps: int,
    bin_: int = 10,
    eval_tokens: int | None = None,
) -> dict:
    """Train nanoGPT's shape on the course BPE at peak rate ``lr`` for ``steps``.

    ``eval_tokens`` evaluates only a prefix of the validation split (quick tests)."""
    train_ids, val_ids = as_ids(data["train_ids"]), as_ids(data["val_ids"])
    cfg = GPTConfig(
        vocab_size=data["vocab_size"], context_length=64, n_layer=4, n_head=4,
        n_embd=128,
    )  # fmt: skip
    tcfg = nanogpt_train_config(steps)
    tcfg.lr, tcfg.min_lr, tcfg.seed = lr, lr / 10, seed
    tcfg.warmup_steps = min(tcfg.warmup_steps, steps // 5)  # tiny test runs
    tcfg.eval_interval, tcfg.eval_iters = max(1, steps // 10), 4
    seed_everything(seed)
    model = GPT(cfg)
    t0, c0 = time.perf_counter(), time.process_time()
    hist = train(model, train_ids, val_ids, tcfg, progress=False)
    val_nats = evaluate_split(model, val_ids, batch_size=64, max_tokens=eval_tokens)
    n_val = eval_tokens or len(val_ids)  # a prefix: its share of the characters
    n_chars = data["val_chars"] * n_val / len(val_ids)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    losses = np.array([r["loss"] for r in hist["train"]])
    ln_v = math.log(data["vocab_size"])
    later = losses[bin_:]
    n_bins = len(losses) // bin_
    binned = losses[: n_bins * bin_].reshape(n_bins, bin_).mean(1)
    return {
        "lr": lr,
        "seed": seed,
        "steps": steps,
        "warmup_steps": tcfg.warmup_steps,
        "diverged": is_diverged(losses, ln_v, skip=bin_),
        "max_train_loss_after_first_bin": finite_or_none(
            float(later.max()) if later.size else float("nan")
        ),
        "final_val_loss": finite_or_none(val_nats),
        "final_val_bpc": finite_or_none(bits_per_char(val_nats, n_val, n_chars)),
        "train_loss_binned": [finite_or_none(v) for v in binned],
        "eval": [
            {k: finite_or_none(e[k]) if "loss" in k else e[k] for k in e}
            for e in hist["eval"]
        ],
        "wall_s": wall,
        "cpu_s": cpu,  # what the run costs on a core of its own
    }


def sweep(
    lrs=LRS,
    seeds=SEEDS,
    steps: int = STEPS,
    bin_: int = 10,
    eval_tokens: int | None = None,
    log=print,
) -> dict:
    """Every rate with every seed, one after another; the JSON the chapter reads."""
    tok = course_tokenizer(1024)
    data = shakespeare_splits(tok)
    data["vocab_size"] = tok.vocab_size
    t0, c0 = time.perf_counter(), time.process_time()
    runs = []
    for lr in lrs:
        for seed in seeds:
            r = sweep_run(data, lr, seed, steps, bin_, eval_tokens)
            runs.append(r)
            val = "nan" if r["final_val_bpc"] is None else f"{r['final_val_bpc']:.3f}"
            log(
                f"lr {lr:g} seed {seed}: val {val} bits/char, "
                f"diverged {r['diverged']}, {r['wall_s']:.0f} s "
                f"({r['cpu_s']:.0f} s CPU)"
            )
    return {
        "model": "nanoGPT CPU shape (4 x 128, context 64) on the course BPE (V=1024)",
        "batch_size": 12,
        "context_length": 64,
        "steps": steps,
        "loss_bin_steps": bin_,
        "lrs": list(lrs),
        "seeds": list(seeds),
        "ln_V": math.log(tok.vocab_size),
        "tokens_per_char_val": len(data["val_ids"]) / data["val_chars"],
        "runs": runs,
        "total_wall_s": time.perf_counter() - t0,
        "total_cpu_s": time.process_time() - c0,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "machine": machine(),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lrs", type=float, nargs="+", default=list(LRS))
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--bin", type=int, default=10, help="steps per logged loss")
    ap.add_argument(
        "--eval-tokens", type=int, default=None, help="final loss on a prefix only"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", default=str(RESULTS), help="where the JSON goes")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = sweep(args.lrs, args.seeds, args.steps, args.bin, args.eval_tokens)
    write_files(args.results, {"lr_sweep.json": json.dumps(out, indent=1) + "\n"})
    print(
        f"{len(out['runs'])} runs in {out['total_wall_s'] / 60:.1f} min "
        f"({out['total_cpu_s'] / 60:.1f} min of CPU time)"
    )


if __name__ == "__main__":
    main()
