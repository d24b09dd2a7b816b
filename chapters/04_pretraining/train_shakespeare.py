"""Train the course's Shakespeare model and the chapter's comparison runs.

  python chapters/04_pretraining/train_shakespeare.py laptop   # shipped model
  python chapters/04_pretraining/train_shakespeare.py compute  # char vs BPE, same FLOPs

``laptop`` (or ``gpu``) trains ``shared.recipes.recipe(...)`` with the course BPE,
saves snapshots (samples, attention maps) during training, and ships the result to
``data/models/shakespeare-laptop/`` (``-gpu/``): weights, tokenizer, config.json with
measured results. ``compute`` trains nanoGPT's char-level CPU model and a BPE model
of the same shape for the same training compute (6 N D) with our loop. Results and
training logs go to ``chapters/04_pretraining/results/`` (small JSON, read by the
notebook). Checkpoints go to ``runs/`` (git-ignored): rerun the command to resume
(after Ctrl-C too); the samples and attention maps taken so far are kept in the run
folder, so a resumed or repeated run ships all of them.

Only a run of the full recipe replaces the shipped model and the chapter's results:
a trial run (``--steps`` shorter or longer than the recipe) writes them only where
``--out`` / ``--results`` say, or with ``--ship``. Every file is written to a
temporary name, flushed to the disk and renamed, the model's files all together,
so a full disk or a crash leaves the shipped files as they were.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from shared.checkpoint import config_dict
from shared.data import atomic_write, read_text, write_files
from shared.dataset import train_val_split
from shared.device import describe_environment, get_device, seed_everything
from shared.flops import flops_per_token, mfu, peak_flops
from shared.generation import generate
from shared.loss import bits_per_char, evaluate_split
from shared.model import GPT, GPTConfig
from shared.pretrained import (
    LAPTOP_MODEL_DIR,
    as_ids,
    save_course_model,
    shakespeare_splits,
)
from shared.recipes import NANOGPT_CPU, recipe
from shared.tokenizer import CharTokenizer, course_tokenizer
from shared.train import TrainConfig, train

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
RUNS = HERE.parent.parent / "runs" / "04_pretraining"
MODEL_DIRS = {
    "laptop": LAPTOP_MODEL_DIR,
    "gpu": LAPTOP_MODEL_DIR.parent / "shakespeare-gpu",
}
SAMPLE_PROMPT = "ROMEO:\n"
ATTENTION_TEXT = "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n"


def machine() -> dict:
    """Where the numbers were measured (the load average says how shared it was)."""
    info = describe_environment()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["load average (1, 5, 15 min) at end"] = str(os.getloadavg())
    except OSError:
        info["cpu"] = platform.processor()
    return info


def snapshot_steps(max_steps: int) -> list[int]:
    """Steps at which to keep samples and attention maps: early, middle, end."""
    return sorted({0, 100, 300, 1000, max_steps // 2, max_steps})


def run_model(args: argparse.Namespace) -> None:
    name = args.what  # "laptop" or "gpu"
    rec = recipe(name)
    device = get_device()
    full = args.steps in (None, rec.train.max_steps)  # the recipe as it ships
    if args.steps:
        rec.train.max_steps = args.steps
    tok = course_tokenizer(rec.vocab_size)
    data = shakespeare_splits(tok)
    train_ids, val_ids = as_ids(data["train_ids"]), as_ids(data["val_ids"])
    seed_everything(rec.train.seed)
    model = GPT(rec.model).to(device)
    fpt = flops_per_token(rec.model)
    keep = snapshot_steps(rec.train.max_steps)
    attn_ids = torch.tensor([tok.encode(ATTENTION_TEXT)], device=device)
    prompt_ids = torch.tensor([tok.encode(SAMPLE_PROMPT)], device=device)
    ckpt = Path(args.runs) / name
    resume = (ckpt / "latest").exists() and not args.fresh
    snap_text, snap_maps = ckpt / "snapshots.json", ckpt / "snapshots.safetensors"
    samples, maps = {}, {}
    if resume and snap_text.exists():
        samples = json.loads(snap_text.read_text())
        maps = load_file(str(snap_maps)) if snap_maps.exists() else {}

    def on_eval(step: int, m: torch.nn.Module, record: dict) -> None:
        if step not in keep:
            return
        g = torch.Generator(device=device).manual_seed(0)
        out = generate(m, prompt_ids, 150, temperature=0.8, top_k=50, generator=g)
        samples[str(step)] = tok.decode(out[0].tolist())
        maps[f"step_{step}"] = (
            m.attention_maps(attn_ids)[:, 0].half().cpu().contiguous()
        )
        # kept beside the checkpoints, so a resumed run still ships every snapshot
        with atomic_write(snap_maps) as f:
            f.write(save(maps))
        with atomic_write(snap_text, "w", encoding="utf-8") as f:
            f.write(json.dumps(samples))

    t0 = time.perf_counter()
    hist = train(
        model, train_ids, val_ids, rec.train, checkpoint_dir=ckpt, resume=resume,
        allow_config_change=args.allow_config_change, on_eval=on_eval, progress=True,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    val_nats = evaluate_split(model, val_ids, batch_size=32)
    tokens = rec.train.max_steps * rec.train.tokens_per_step(rec.model.context_length)
    # tokens_per_s is logged every log_interval steps and at the last step
    tps = sorted(r["tokens_per_s"] for r in hist["train"] if "tokens_per_s" in r)
    tps_median = tps[len(tps) // 2]
    peak, peak_src = peak_flops(device)
    results = {
        "val_loss_nats_per_token": val_nats,
        "val_bits_per_char": bits_per_char(val_nats, len(val_ids), data["val_chars"]),
        "val_tokens": len(val_ids),
        "val_chars": data["val_chars"],
        "params": model.num_parameters(),
        "params_N_for_flops": fpt["N"],
        "training_tokens": tokens,
        "training_chars_equiv": tokens * data["train_chars"] / len(train_ids),
        "flops_per_token": fpt["total"],
        "training_flops": fpt["total"] * tokens,
        "training_flops_6ND": fpt["6N"] * tokens,
        "train_wall_s": hist["elapsed_s"],
        "script_wall_s_this_invocation": wall,
        "resumed": resume,
        "tokens_per_s_median": tps_median,
        "peak_flops": peak,
        "peak_flops_source": peak_src,
        "mfu": mfu(tps_median, fpt["total"], peak),
        "torch_threads": torch.get_num_threads(),
        "machine": machine(),
    }
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=1))

    ship = full or args.ship
    trial = f"a trial run ({rec.train.max_steps} steps, not the recipe's)"
    out = args.out or (MODEL_DIRS[name] if ship else None)
    if out is None:
        print(
            f"{trial}: the model is not shipped to {MODEL_DIRS[name]} "
            "(--ship to replace it, --out DIR to write it elsewhere)"
        )
    else:
        info = {
            "name": f"shakespeare-{name}",
            "description": "GPT trained from scratch on Tiny Shakespeare (first 90% "
            "of characters) with the course BPE; chapter 04 of the course.",
            "tokenizer_file": "tokenizer.json",
            "tokenizer": f"course_tokenizer(vocab_size={rec.vocab_size})",
            "model_config": config_dict(rec.model),
            "train_config": rec.train.to_dict(),
            "results": results,
            "nanogpt_cpu_baseline": NANOGPT_CPU,
        }
        save_course_model(model, tok, out, info)  # all files replaced, or none
        print(f"shipped to {out}")
    results_dir = args.results or (RESULTS if ship else None)
    if results_dir is None:
        print(
            f"{trial}: the chapter's results in {RESULTS} are kept "
            "(--ship to replace them, --results DIR to write them elsewhere)"
        )
        return
    log = {"history": hist, "samples": samples, "snapshot_steps": keep}
    log["attention_tokens"] = tok.tokens(attn_ids[0].tolist())
    write_files(results_dir, {f"{name}_run.json": json.dumps(log) + "\n",
                              f"{name}_attention.safetensors": save(maps)})  # fmt: skip
    print(f"wrote the training log and attention maps to {results_dir}")


def compute_budget() -> float:
    """nanoGPT's CPU run in training FLOPs, 6 N D."""
    return 6 * NANOGPT_CPU["params"] * NANOGPT_CPU["tokens"]


def nanogpt_train_config(max_steps: int) -> TrainConfig:
    """nanoGPT's train_shakespeare_char settings with its CPU overrides."""
    return TrainConfig(
        max_steps=max_steps, batch_size=12, lr=1e-3, min_lr=1e-4, warmup_steps=100,
        weight_decay=0.1, betas=(0.9, 0.99), grad_clip=1.0, eval_interval=100,
        eval_iters=20, seed=1337,
    )  # fmt: skip


def equal_compute_run(kind: str, lr: float | None = None, budget: float | None = None):
    """Train nanoGPT's CPU shape, char-level or BPE, for ``budget`` FLOPs (6 N D)."""
    budget = budget or compute_budget()
    text = read_text("tinyshakespeare")
    train_text, val_text = train_val_split(text, 0.1)
    if kind == "char":
        tok = CharTokenizer(text)
        train_ids = as_ids(tok.encode(train_text))
        val_ids = as_ids(tok.encode(val_text))
    else:
        tok = course_tokenizer(1024)
        data = shakespeare_splits(tok)
        train_ids, val_ids = as_ids(data["train_ids"]), as_ids(data["val_ids"])
    cfg = GPTConfig(
        vocab_size=tok.vocab_size, context_length=64, n_layer=4, n_head=4, n_embd=128
    )
    n = flops_per_token(cfg)["N"]
    tcfg = nanogpt_train_config(1)
    if lr is not None:
        tcfg.lr, tcfg.min_lr = lr, lr / 10
    tcfg.max_steps = round(budget / (6 * n * tcfg.tokens_per_step(64)))
    seed_everything(tcfg.seed)
    model = GPT(cfg)
    hist = train(model, train_ids, val_ids, tcfg, progress=False)
    val_nats = evaluate_split(model, val_ids, batch_size=64)
    per_char = len(val_ids) / len(val_text)
    return {
        "kind": kind,
        "vocab_size": tok.vocab_size,
        "N": n,
        "steps": tcfg.max_steps,
        "tokens": tcfg.max_steps * tcfg.tokens_per_step(64),
        "flops_6ND": 6 * n * tcfg.max_steps * tcfg.tokens_per_step(64),
        "lr": tcfg.lr,
        "val_bits_per_char": bits_per_char(val_nats, len(val_ids), len(val_text)),
        "train_wall_s": hist["elapsed_s"],
        "curve": [
            {
                "tokens": e["tokens"],
                "chars": e["tokens"] / per_char,
                "flops": 6 * n * e["tokens"],
                "val_bpc": e["val_loss"] * per_char / math.log(2),
                "train_bpc": e["train_loss"] * per_char / math.log(2),
            }
            for e in hist["eval"]
        ],
    }


def run_compute(args: argparse.Namespace) -> None:
    runs = []
    for kind in ("char", "bpe"):
        r = equal_compute_run(kind)
        print(
            f"{kind}: {r['steps']} steps, {r['tokens']:,} tokens, "
            f"{r['flops_6ND']:.3g} FLOPs -> val {r['val_bits_per_char']:.3f} bits/char "
            f"in {r['train_wall_s']:.0f} s"
        )
        runs.append(r)
    out = {"budget_flops_6ND": compute_budget(), "runs": runs, "machine": machine()}
    text = json.dumps(out, indent=1) + "\n"
    write_files(args.results or RESULTS, {"equal_compute.json": text})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["laptop", "gpu", "compute"])
    ap.add_argument("--steps", type=int, default=None, help="override max_steps")
    ap.add_argument("--out", default=None, help="where to ship the model")
    ap.add_argument(
        "--ship",
        action="store_true",
        help="ship a trial run (--steps) to data/models and the chapter's results",
    )
    ap.add_argument("--fresh", action="store_true", help="ignore an old checkpoint")
    ap.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume although the training settings (e.g. --steps) changed",
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--results", default=None, help=f"where the logs go ({RESULTS})")
    ap.add_argument("--runs", default=str(RUNS), help="where the checkpoints go")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    (run_compute if args.what == "compute" else run_model)(args)


if __name__ == "__main__":
    main()
