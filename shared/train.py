"""Pretraining: config, AdamW groups, LR schedule, batches, evaluation, the loop,
checkpoints with exact resume, and throughput / MFU estimates."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn
from tqdm.auto import tqdm

CHECKPOINT_FORMAT = 1


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


# --------------------------------------------------------------------------- batches


class BatchSampler:
    """Random (x, y) windows from one long token array, nanoGPT style.

    Its only randomness is its own ``torch.Generator``, so saving the generator state
    (plus the batch counter) saves the exact data position of a run.
    """

    def __init__(self, data, batch_size: int, context_length: int, seed: int = 0):
        self.data = torch.as_tensor(np.asarray(data, dtype=np.int64))
        if self.data.ndim != 1 or len(self.data) <= context_length + 1:
            raise ValueError(
                f"need a 1-D token array longer than context_length + 1 = "
                f"{context_length + 1}; got shape {tuple(self.data.shape)}"
            )
        self.batch_size = batch_size
        self.context_length = context_length
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0
        self._offsets = torch.arange(context_length)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch: inputs (B, T) and targets shifted by one (B, T)."""
        high = len(self.data) - self.context_length
        starts = torch.randint(high, (self.batch_size,), generator=self.generator)
        idx = starts[:, None] + self._offsets
        self.batches_drawn += 1
        return self.data[idx], self.data[idx + 1]

    def state_dict(self) -> dict:
        """RNG state and counter: enough to continue with the very same batches."""
        return {
            "generator": self.generator.get_state(),
            "batches_drawn": self.batches_drawn,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from ``state_dict``."""
        self.generator.set_state(state["generator"])
        self.batches_drawn = int(state["batches_drawn"])


# --------------------------------------------------------------------------- evaluation


def _context_length(model: nn.Module, context_length: int | None) -> int:
    if context_length is not None:
        return context_length
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "context_length"):
        raise ValueError("pass context_length: the model has no config.context_length")
    return int(cfg.context_length)


def _autocast(device: torch.device, dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype != "bfloat16":
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', not {dtype!r}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def estimate_loss(
    model: nn.Module,
    splits: dict[str, object],
    *,
    eval_iters: int,
    batch_size: int,
    context_length: int | None = None,
    seed: int = 0,
    dtype: str = "float32",
) -> dict[str, float]:
    """Mean loss (nats/token) per split over ``eval_iters`` random batches.

    A fresh generator with a fixed seed draws the same batches at every evaluation,
    so successive points on the curve differ only because the model changed.
    """
    T = _context_length(model, context_length)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = {}
    for name, data in splits.items():
        sampler = BatchSampler(data, batch_size, T, seed=seed)
        losses = []
        for _ in range(eval_iters):
            x, y = sampler.next()
            with _autocast(device, dtype):
                _, loss = model(x.to(device), y.to(device))
            losses.append(loss.float().item())
        out[name] = float(np.mean(losses))
    model.train(was_training)
    return out


@torch.no_grad()
def evaluate_split(
    model: nn.Module,
    data,
    *,
    context_length: int | None = None,
    batch_size: int = 32,
    max_tokens: int | None = None,
) -> float:
    """Mean loss (nats/token) over a whole split, in non-overlapping windows.

    Every token (but the first) is predicted exactly once; deterministic, unlike
    ``estimate_loss``. ``max_tokens`` evaluates only a prefix (fast checks).
    """
    T = _context_length(model, context_length)
    device = next(model.parameters()).device
    ids = torch.as_tensor(np.asarray(data, dtype=np.int64))
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    n_win = (len(ids) - 1) // T
    if n_win == 0:
        raise ValueError(f"split of {len(ids)} tokens is shorter than one window ({T})")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    x_all = ids[: n_win * T].view(n_win, T)
    y_all = ids[1 : n_win * T + 1].view(n_win, T)
    for i in range(0, n_win, batch_size):
        x, y = (
            x_all[i : i + batch_size].to(device),
            y_all[i : i + batch_size].to(device),
        )
        _, loss = model(x, y)
        total += loss.item() * y.numel()
        count += y.numel()
    model.train(was_training)
    return total / count


def bits_per_char(nats_per_token: float, n_tokens: int, n_chars: int) -> float:
    """Convert a per-token loss to bits per character, comparable across tokenizers."""
    return nats_per_token * n_tokens / n_chars / math.log(2)


# ------------------------------------------------------------------------- checkpoints


def model_config_dict(model: nn.Module) -> dict:
    """The model's config as a plain dict (empty without a dataclass config)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and dataclasses.is_dataclass(cfg):
        return json.loads(json.dumps(dataclasses.asdict(cfg)))
    return {}


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    step: int,
    *,
    train_config: TrainConfig | None = None,
    sampler: BatchSampler | None = None,
    history: dict | None = None,
) -> Path:
    """Save a resumable checkpoint into the directory ``path``.

    ``model.safetensors``: the weights. ``state.pt``: optimizer state and RNG states,
    only tensors and plain containers (loaded with ``weights_only=True``).
    ``checkpoint.json``: step, configs, data position and the training history.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path / "model.safetensors"))  # handles tied weights
    state = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if sampler is not None:
        state["sampler_rng"] = sampler.generator.get_state()
    torch.save(state, path / "state.pt")
    meta = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "model_config": model_config_dict(model),
        "train_config": train_config.to_dict() if train_config else None,
        "batches_drawn": sampler.batches_drawn if sampler is not None else None,
        "history": history,
    }
    (path / "checkpoint.json").write_text(json.dumps(meta, indent=1))
    return path


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    sampler: BatchSampler | None = None,
    restore_rng: bool = True,
) -> dict:
    """Load a ``save_checkpoint`` directory into ``model`` (optimizer, sampler).

    Refuses a checkpoint whose model config differs from ``model.config``, and never
    unpickles arbitrary objects. Returns the JSON metadata (step, configs, history).
    """
    path = Path(path)
    if not (path / "checkpoint.json").exists():
        raise FileNotFoundError(f"no checkpoint at {path} (checkpoint.json missing)")
    meta = json.loads((path / "checkpoint.json").read_text())
    expected, saved = model_config_dict(model), meta.get("model_config") or {}
    if expected != saved:
        diff = sorted(
            f"{k}: checkpoint {saved.get(k)!r} vs model {expected.get(k)!r}"
            for k in set(expected) | set(saved)
            if expected.get(k) != saved.get(k)
        )
        raise ValueError(
            f"checkpoint {path} was saved from a different model config; "
            f"differences: {'; '.join(diff)}"
        )
    load_model(model, str(path / "model.safetensors"), strict=True)
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path / 'state.pt'} holds objects other than tensors and plain "
            "containers; refusing to unpickle it"
        ) from err
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if sampler is not None:
        sampler.generator.set_state(state["sampler_rng"])
        sampler.batches_drawn = int(meta["batches_drawn"])
    if restore_rng:
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    return meta


# --------------------------------------------------------------------------- the loop


def train(
    model: nn.Module,
    train_data,
    val_data,
    cfg: TrainConfig,
    *,
    context_length: int | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    stop_at: int | None = None,
    on_eval: Callable[[int, nn.Module, dict], None] | None = None,
    progress: bool = True,
) -> dict:
    """Train ``model`` (``model(x, y) -> (logits, loss)``) on random windows.

    AdamW groups, warmup + cosine LR, gradient clipping, gradient accumulation and a
    bf16 autocast switch, evaluation every ``eval_interval`` steps (and at the end),
    a tqdm bar, and checkpoints in ``checkpoint_dir`` at every evaluation and when
    stopped (``stop_at`` simulates an interruption; ``resume=True`` continues from
    ``checkpoint_dir`` exactly). Returns the history: per-step ``train`` records
    (step, tokens, loss, lr, grad_norm, tokens_per_s) and ``eval`` records.
    """
    T = _context_length(model, context_length)
    device = next(model.parameters()).device
    optimizer = configure_optimizer(model, cfg)
    sampler = BatchSampler(train_data, cfg.batch_size, T, seed=cfg.seed)
    history: dict = {"train": [], "eval": []}
    step, elapsed = 0, 0.0
    if resume:
        if checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir")
        meta = load_checkpoint(checkpoint_dir, model, optimizer, sampler=sampler)
        step, history = meta["step"], meta["history"]
        elapsed = history.get("elapsed_s", 0.0)
    tokens_per_step = cfg.tokens_per_step(T)
    eval_bs = cfg.eval_batch_size or cfg.batch_size
    splits = {"train": train_data, "val": val_data}

    def save(at: int) -> None:
        if checkpoint_dir is not None:
            history["elapsed_s"] = elapsed
            save_checkpoint(
                checkpoint_dir, model, optimizer, at, train_config=cfg,
                sampler=sampler, history=history,
            )  # fmt: skip

    def evaluate(at: int) -> None:
        losses = estimate_loss(
            model, splits, eval_iters=cfg.eval_iters, batch_size=eval_bs,
            context_length=T, seed=cfg.seed + 1, dtype=cfg.dtype,
        )  # fmt: skip
        rec = {"step": at, "tokens": at * tokens_per_step, "elapsed_s": elapsed}
        rec.update({"train_loss": losses["train"], "val_loss": losses["val"]})
        history["eval"].append(rec)
        if on_eval is not None:
            on_eval(at, model, rec)

    model.train()
    bar = tqdm(
        total=cfg.max_steps, initial=step, disable=not progress, mininterval=2.0,
        desc="train", unit="step", dynamic_ncols=True,
    )  # fmt: skip
    window_t, window_tokens = time.perf_counter(), 0
    try:
        while step < cfg.max_steps:
            if stop_at is not None and step >= stop_at:
                break
            if step % cfg.eval_interval == 0 and not _evaluated(history, step):
                evaluate(step)
                save(step)
                window_t, window_tokens = time.perf_counter(), 0  # exclude eval time
            t_step = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for _ in range(cfg.grad_accum_steps):
                x, y = sampler.next()
                with _autocast(device, cfg.dtype):
                    _, loss = model(x.to(device), y.to(device))
                (loss / cfg.grad_accum_steps).backward()
                loss_sum += loss.item()
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            optimizer.step()
            step += 1
            now = time.perf_counter()
            elapsed += now - t_step
            window_tokens += tokens_per_step
            rec = {
                "step": step,
                "tokens": step * tokens_per_step,
                "loss": loss_sum / cfg.grad_accum_steps,
                "lr": lr,
                "grad_norm": float(grad_norm),
            }
            if step % cfg.log_interval == 0:
                rec["tokens_per_s"] = window_tokens / max(now - window_t, 1e-9)
                window_t, window_tokens = now, 0
                bar.set_postfix(
                    loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}"
                )
            history["train"].append(rec)
            bar.update(1)
        else:
            if not _evaluated(history, step):
                evaluate(step)
    except KeyboardInterrupt:
        print(f"interrupted at step {step}; saving a checkpoint to resume from")
    finally:
        bar.close()
    save(step)
    history["elapsed_s"] = elapsed
    return history


def _evaluated(history: dict, step: int) -> bool:
    return bool(history["eval"]) and history["eval"][-1]["step"] == step


# --------------------------------------------------------------------------- throughput


# FLOPs per token are counted in shared.flops.flops_per_token (6N + attention term).


# dense bf16 tensor-core peaks from the vendors' data sheets (no sparsity)
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def measure_peak_flops(
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    size: int = 1024,
    repeats: int = 20,
) -> float:
    """Best-of FLOP/s of a square matmul: a practical peak for this machine."""
    device = torch.device(device or "cpu")
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best


def peak_flops(device: torch.device | str | None = None) -> tuple[float, str]:
    """Peak FLOP/s for MFU and where the number comes from."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value, f"{name}: data-sheet dense bf16 peak"
    value = measure_peak_flops(device)
    return value, f"{device.type}: measured fp32 1024x1024 matmul (best of 20)"


def mfu(tokens_per_s: float, flops_per_tok: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak."""
    return tokens_per_s * flops_per_tok / peak
