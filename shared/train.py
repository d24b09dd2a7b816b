"""Pretraining: the training configuration, AdamW parameter groups, the learning-rate
schedule, and the loop (evaluation, progress, checkpoints that resume exactly).

Batches come from ``shared.dataset.BatchSampler``, losses from ``shared.loss``,
checkpoints from ``shared.checkpoint``, FLOP and MFU counts from ``shared.flops``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from shared.checkpoint import load_checkpoint, save_checkpoint
from shared.dataset import BatchSampler
from shared.loss import context_length_of, estimate_loss
from shared.precision import autocast


@dataclass
class TrainConfig:
    """Everything that decides how a model is trained (not what the model is)."""

    max_steps: int = 2000
    batch_size: int = 12
    grad_accum_steps: int = 1  # micro-batches per optimizer step (chapter 05)
    lr: float = 1e-3
    min_lr: float = 1e-4  # the cosine decays to this, not to zero
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    eval_interval: int = 250
    eval_iters: int = 20
    eval_batch_size: int | None = None  # None: same as batch_size
    log_interval: int = 10
    dtype: str = "float32"  # "bfloat16": autocast the forward pass to bf16
    compile: bool = False  # torch.compile the model: pays off on GPUs, rarely on CPUs
    seed: int = 1337

    def tokens_per_step(self, context_length: int) -> int:
        """Tokens consumed by one optimizer step."""
        return self.batch_size * self.grad_accum_steps * context_length

    def to_dict(self) -> dict:
        """Plain JSON-ready dict."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Inverse of ``to_dict`` (ignores unknown keys)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "betas" in kw:
            kw["betas"] = tuple(kw["betas"])
        return cls(**kw)


# --------------------------------------------------------------------------- optimizer


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay every >=2-D weight, no decay for biases and norm gains.

    Matrices (linear layers and the token embedding, which doubles as the tied output
    layer) hold the model's capacity, so shrinking them regularises. Biases and
    LayerNorm/RMSNorm gains are 1-D scales and offsets: pulling a gain towards 0 just
    shrinks the signal, so like GPT-2/3 and nanoGPT we leave them undecayed.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # tied weights appear once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def configure_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the decay / no-decay parameter groups."""
    groups = parameter_groups(model, cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup for ``warmup_steps``, then cosine decay to ``min_lr`` at
    ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr
    ratio = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


# --------------------------------------------------------------------------- the loop


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold back Ctrl-C for the duration of the block, then raise it.

    The optimizer update and the step counter change together; a Ctrl-C between them
    would leave weights that belong to no step boundary.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *args: caught.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def train(
    model: nn.Module,
    train_data,
    val_data,
    cfg: TrainConfig,
    *,
    context_length: int | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    allow_config_change: bool = False,
    stop_at: int | None = None,
    on_eval: Callable[[int, nn.Module, dict], None] | None = None,
    progress: bool = True,
) -> dict:
    """Train ``model`` (``model(x, y) -> (logits, loss)``) on random windows.

    AdamW groups, warmup + cosine LR, gradient clipping, gradient accumulation and a
    bf16 autocast switch; evaluation every ``eval_interval`` steps and at the end
    (``on_eval(step, model, record)`` runs there); a tqdm bar. With
    ``checkpoint_dir`` a checkpoint is saved at every evaluation, at ``stop_at`` (a
    planned stop) and on Ctrl-C, always at a step boundary, so ``resume=True``
    continues bit for bit. Resuming with other training settings is refused unless
    ``allow_config_change``. Returns the history: per-step ``train`` records (step,
    tokens, loss, lr, grad_norm, and tokens_per_s every ``log_interval`` steps) and
    ``eval`` records.
    """
    T = context_length_of(model, context_length)
    device = next(model.parameters()).device
    optimizer = configure_optimizer(model, cfg)
    sampler = BatchSampler(train_data, cfg.batch_size, T, seed=cfg.seed)
    history: dict = {"train": [], "eval": []}
    step, elapsed = 0, 0.0
    if resume:
        if checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir")
        meta = load_checkpoint(
            checkpoint_dir, model, optimizer, sampler=sampler, train_config=cfg,
            allow_config_change=allow_config_change,
        )  # fmt: skip
        step, history = meta["step"], meta["history"]
        elapsed = history.get("elapsed_s", 0.0)
    tokens_per_step = cfg.tokens_per_step(T)
    eval_bs = cfg.eval_batch_size or cfg.batch_size
    splits = {"train": train_data, "val": val_data}
    last = min(cfg.max_steps, stop_at if stop_at is not None else cfg.max_steps)

    def save() -> None:
        if checkpoint_dir is not None:
            history["elapsed_s"] = elapsed
            save_checkpoint(
                checkpoint_dir, model, optimizer, step, train_config=cfg,
                sampler=sampler, history=history,
            )  # fmt: skip

    def evaluate() -> None:
        losses = estimate_loss(
            model, splits, eval_iters=cfg.eval_iters, batch_size=eval_bs,
            context_length=T, seed=cfg.seed + 1, dtype=cfg.dtype,
        )  # fmt: skip
        rec = {"step": step, "tokens": step * tokens_per_step, "elapsed_s": elapsed}
        rec.update({"train_loss": losses["train"], "val_loss": losses["val"]})
        if on_eval is not None:
            on_eval(step, model, rec)
        history["eval"].append(rec)  # last: an interrupted evaluation is redone

    forward = torch.compile(model) if cfg.compile else model  # same parameters
    model.train()
    bar = tqdm(
        total=cfg.max_steps, initial=step, disable=not progress, mininterval=2.0,
        desc="train", unit="step", dynamic_ncols=True,
    )  # fmt: skip
    window_t, window_tokens = time.perf_counter(), 0
    # "boundary": weights, optimizer, sampler and RNG are those between two steps;
    # "compute": only the sampler and the RNG moved (roll them back to save);
    # "update": inside optimizer.step(), the weights may be half updated
    phase = "boundary"
    try:
        while step < last:
            if step % cfg.eval_interval == 0 and not _evaluated(history, step):
                evaluate()
                save()
                model.train()
                window_t, window_tokens = time.perf_counter(), 0  # exclude eval time
            t_step = time.perf_counter()
            rollback = (sampler.state_dict(), torch.get_rng_state())
            phase = "compute"
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for _ in range(cfg.grad_accum_steps):
                x, y = sampler.next()
                with autocast(device, cfg.dtype):
                    # [1]: no name keeps the logits alive through backward
                    loss = forward(x.to(device), y.to(device))[1]
                (loss / cfg.grad_accum_steps).backward()
                loss_sum += loss.item()
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
            grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            with _sigint_deferred():
                phase = "update"
                optimizer.step()
                step += 1
                elapsed += time.perf_counter() - t_step
                rec = {
                    "step": step,
                    "tokens": step * tokens_per_step,
                    "loss": loss_sum / cfg.grad_accum_steps,
                    "lr": lr,
                    "grad_norm": grad_norm,
                }
                history["train"].append(rec)
                phase = "boundary"
            window_tokens += tokens_per_step
            if step % cfg.log_interval == 0 or step == cfg.max_steps:
                now = time.perf_counter()
                rec["tokens_per_s"] = window_tokens / max(now - window_t, 1e-9)
                window_t, window_tokens = now, 0
                bar.set_postfix(
                    loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}"
                )
            bar.update(1)
        if step == cfg.max_steps and not _evaluated(history, step):
            evaluate()
        save()
    except KeyboardInterrupt:
        if phase == "update":
            print(
                f"interrupted inside the optimizer update of step {step + 1}: the "
                "weights belong to no step, so the last saved checkpoint stays"
            )
        else:
            if phase == "compute":  # undo the batches drawn and the dropout masks
                sampler.load_state_dict(rollback[0])
                torch.set_rng_state(rollback[1])
            save()
            where = f" to {checkpoint_dir}" if checkpoint_dir is not None else ""
            print(f"interrupted at step {step}; saved a checkpoint{where}")
        raise
    finally:
        bar.close()
    history["elapsed_s"] = elapsed
    return history


def _evaluated(history: dict, step: int) -> bool:
    return bool(history["eval"]) and history["eval"][-1]["step"] == step


def train_on_batches(
    model: nn.Module,
    batches: Iterator,
    loss_fn: Callable[[nn.Module, object], torch.Tensor | tuple[torch.Tensor, dict]],
    cfg: TrainConfig,
    *,
    evaluate: Callable[[int, nn.Module], dict] | None = None,
    progress: bool = True,
) -> dict:
    """The fine-tuning loop: ``loss_fn(model, batch)`` on batches someone else makes.

    Same optimizer as pretraining (AdamW groups over the *trainable* parameters only,
    warmup + cosine, clipping); ``loss_fn`` may return ``(loss, metrics)`` and the
    metrics are logged with each step. ``evaluate(step, model) -> dict`` runs every
    ``eval_interval`` steps and at the end (in eval mode). Returns ``train`` records
    (step, loss, lr, grad_norm, step_s, metrics) and ``eval`` records.
    """
    torch.manual_seed(cfg.seed)
    optimizer = configure_optimizer(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    history: dict = {"train": [], "eval": []}

    def run_eval(step: int) -> None:
        if evaluate is None:
            return
        model.eval()
        rec = {"step": step, **evaluate(step, model)}
        history["eval"].append(rec)
        model.train()

    model.train()
    bar = tqdm(range(cfg.max_steps), disable=not progress, mininterval=2.0,
               desc="fine-tune", unit="step", dynamic_ncols=True)  # fmt: skip
    for step in bar:
        if step % cfg.eval_interval == 0:
            run_eval(step)
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        metrics: dict = {}
        loss_sum = 0.0
        for _ in range(cfg.grad_accum_steps):
            out = loss_fn(model, next(batches))
            loss, metrics = out if isinstance(out, tuple) else (out, {})
            (loss / cfg.grad_accum_steps).backward()
            loss_sum += loss.item()
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = float(nn.utils.clip_grad_norm_(trainable, max_norm))
        optimizer.step()
        rec = {"step": step + 1, "loss": loss_sum / cfg.grad_accum_steps, "lr": lr,
               "grad_norm": grad_norm, "step_s": time.perf_counter() - t0}  # fmt: skip
        rec.update({k: float(v) for k, v in metrics.items()})
        history["train"].append(rec)
        if (step + 1) % cfg.log_interval == 0:
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
    bar.close()
    run_eval(cfg.max_steps)
    model.eval()
    return history
