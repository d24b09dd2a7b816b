"""Checkpoints: resume a training run exactly, written atomically, loaded safely.

A checkpoint directory holds one folder per saved step and a pointer to the newest::

    runs/my_run/
      latest                    "step-000120": the folder to resume from
      step-000120/
        model.safetensors       the weights
        state.pt                optimizer, RNG and sampler states (tensors only)
        checkpoint.json         step, configs, data position, training history

A save writes a fresh folder; only when all three files are complete does ``latest``
move to it (an atomic rename), and only then is the previous folder deleted. A crash
or Ctrl-C during a save leaves the previous checkpoint in place, and nothing
half-written is ever loaded.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import pickle
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from shared.data import atomic_write

CHECKPOINT_FORMAT = 2
LATEST = "latest"
# model-config fields that change how a model runs, not its weights: a checkpoint
# saved with dropout 0.1 loads into a model with dropout 0.0 or the explicit attention
WEIGHT_NEUTRAL_FIELDS = frozenset({"dropout", "attn_impl"})
# training-config fields that change what is logged, not what is trained
RUN_NEUTRAL_FIELDS = frozenset(
    {"eval_interval", "eval_iters", "eval_batch_size", "log_interval"}
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: damaged, or from another model or run."""


def config_dict(config) -> dict:
    """A dataclass config as a plain JSON-ready dict (empty for ``None``)."""
    if config is None:
        return {}
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_differences(saved: dict, current, ignore=frozenset()) -> list[str]:
    """``field: saved -> current`` for every field that differs (ignoring ``ignore``).

    ``saved`` is completed with ``current``'s class defaults first, so a checkpoint
    written before a config field existed still matches a config at its default.
    """
    now = config_dict(current)
    if current is not None:
        known = {f.name for f in dataclasses.fields(current)}
        try:
            saved = config_dict(
                type(current)(**{k: saved[k] for k in known & set(saved)})
            )
        except (TypeError, ValueError):
            pass  # not even a valid config: every differing field is reported
    return [
        f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
        for k in sorted(set(saved) | set(now))
        if k not in ignore and saved.get(k) != now.get(k)
    ]


def load_weights(model: nn.Module, file: str | Path, remedy: str) -> None:
    """Load safetensors weights into ``model``; a damaged file is named, with a fix."""
    file = Path(file)
    if not file.exists():
        raise FileNotFoundError(f"{file} does not exist; {remedy}")
    try:
        load_model(model, str(file), strict=True)
    except Exception as err:  # safetensors raises its own error type for bad headers
        raise CheckpointError(
            f"{file} is damaged or incomplete ({type(err).__name__}: {err}); {remedy}"
        ) from err


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    step: int,
    *,
    train_config=None,
    sampler=None,
    history: dict | None = None,
) -> Path:
    """Save a resumable checkpoint under the directory ``path``; returns its folder.

    Call it only at a step boundary (``train`` does): the files hold the weights,
    optimizer state, RNG states and data position *between* two optimizer steps.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    for n in itertools.count(1):  # the same step saved twice: step-000120-1, ...
        if not (root / name).exists():
            break
        name = f"step-{step:06d}-{n}"
    tmp = root / f".tmp-{name}"
    state = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if sampler is not None:
        state["sampler_rng"] = sampler.generator.get_state()
    meta = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "model_config": config_dict(getattr(model, "config", None)),
        "train_config": train_config.to_dict() if train_config else None,
        "batches_drawn": sampler.batches_drawn if sampler is not None else None,
        "history": history,
    }
    try:
        tmp.mkdir()
        save_model(model, str(tmp / "model.safetensors"))  # handles tied weights
        torch.save(state, tmp / "state.pt")
        (tmp / "checkpoint.json").write_text(json.dumps(meta, indent=1))
        os.replace(tmp, root / name)
        with atomic_write(root / LATEST, "w", encoding="utf-8") as f:
            f.write(name + "\n")  # the moment the new checkpoint becomes the one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in root.iterdir():  # older steps and leftovers of interrupted saves
        if (
            old.is_dir()
            and old.name != name
            and old.name.startswith(("step-", ".tmp-"))
        ):
            shutil.rmtree(old, ignore_errors=True)
    return root / name


def checkpoint_folder(path: str | Path) -> Path:
    """The folder ``path/latest`` names; ``path`` itself if it is one step's folder."""
    path = Path(path)
    pointer = path / LATEST
    if pointer.exists():
        folder = path / pointer.read_text(encoding="utf-8").strip()
        if not (folder / "checkpoint.json").exists():
            raise CheckpointError(f"{pointer} names {folder.name}, which is incomplete")
        return folder
    if (path / "checkpoint.json").exists():  # e.g. runs/x/step-000120 given directly
        return path
    raise FileNotFoundError(f"no checkpoint in {path} ({LATEST} is missing)")


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    sampler=None,
    train_config=None,
    allow_changes: bool = False,
    restore_rng: bool = True,
) -> dict:
    """Load the latest checkpoint under ``path`` into ``model`` (optimizer, sampler).

    Refuses a checkpoint from a model with other weights (config fields such as
    dropout do not count) and, given ``train_config``, one from a run with other
    training settings unless ``allow_changes``. Never unpickles arbitrary objects.
    Returns the JSON metadata (step, configs, history).
    """
    folder = checkpoint_folder(path)
    meta = json.loads((folder / "checkpoint.json").read_text())
    diff = config_differences(
        meta.get("model_config") or {},
        getattr(model, "config", None),
        WEIGHT_NEUTRAL_FIELDS,
    )
    if diff:
        raise CheckpointError(
            f"checkpoint {folder} was saved from a different model config; "
            f"differences (checkpoint -> model): {'; '.join(diff)}"
        )
    if train_config is not None and not allow_changes:
        diff = config_differences(
            meta.get("train_config") or {}, train_config, RUN_NEUTRAL_FIELDS
        )
        if diff:
            raise CheckpointError(
                f"checkpoint {folder} was saved by a run with other training "
                f"settings, so resuming would not continue that run: "
                f"{'; '.join(diff)}. Pass allow_changes=True to resume anyway."
            )
    remedy = f"delete {folder} and resume from an earlier checkpoint or start afresh"
    load_weights(model, folder / "model.safetensors", remedy)
    try:
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{folder / 'state.pt'} holds objects other than tensors and plain "
            "containers; refusing to unpickle it"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        msg = f"{folder / 'state.pt'} is damaged ({err}); {remedy}"
        raise CheckpointError(msg) from err
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
