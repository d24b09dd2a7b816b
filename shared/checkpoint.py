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
import io
import itertools
import json
import os
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from shared.data import (
    DiskFullError,
    atomic_files,
    atomic_write,
    disk_full_error,
    is_disk_full,
)

CHECKPOINT_FORMAT = 2
LATEST = "latest"
# model-config fields that change how a model runs, not its weights: a checkpoint
# saved with dropout 0.1 loads into a model with dropout 0.0 or the explicit attention
WEIGHT_NEUTRAL_FIELDS = frozenset({"dropout", "attn_impl"})
# training-config fields that change what is logged, not what is trained
RUN_NEUTRAL_FIELDS = frozenset(
    {"eval_interval", "eval_iters", "eval_batch_size", "log_interval"}
)
# checkpoint.json's keys (format 2); values may be null, keys may not be missing
CHECKPOINT_KEYS = ("format", "step", "model_config", "train_config",
                   "batches_drawn", "history")  # fmt: skip
# how the scripts and the Python API say "resume with other settings anyway"
ALLOW_CHANGE_HINT = (
    "To resume anyway, pass --allow-config-change to the chapter's training script "
    "(allow_config_change=True to shared.train.train or load_checkpoint); to start "
    "afresh, use another checkpoint folder (--fresh in the scripts that have it)."
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: damaged, or from another model or run."""


def read_json_file(file: str | Path, required=(), known=None, remedy: str = "") -> dict:
    """A JSON object from ``file``; invalid JSON, a missing ``required`` key or one
    not in ``known`` (when given) raise a CheckpointError naming file and key."""
    file = Path(file)
    then = f"; {remedy}" if remedy else ""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON ({err}){then}") from err
    if not isinstance(data, dict):
        found = type(data).__name__
        raise CheckpointError(f"{file} holds a JSON {found}, not an object{then}")
    for key in required:
        if key not in data:
            raise CheckpointError(f"{file} lacks the key {key!r}{then}")
    for key in data:
        if known is not None and key not in known:
            raise CheckpointError(
                f"{file} has an unknown key {key!r} (known: {', '.join(known)}){then}"
            )
    return data


def check_config_fields(saved: dict, config_class, file: str | Path, key: str) -> None:
    """Raise CheckpointError if ``saved`` (``file``'s ``key``) has a field that
    ``config_class`` lacks; missing fields take the class defaults."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"{file}: {key!r} is not a JSON object: {saved!r}")
    fields = [f.name for f in dataclasses.fields(config_class)]
    for name in saved:
        if name not in fields:
            raise CheckpointError(
                f"{file}: {key!r} has an unknown field {name!r} "
                f"({config_class.__name__} has {', '.join(fields)})"
            )


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


def load_weights(
    model: nn.Module, file: str | Path, remedy: str, config: str = "its config"
) -> None:
    """Load safetensors weights into ``model``; a damaged file is named, with a fix,
    and one that does not fit the model (``config`` describes it) says what differs."""
    file = Path(file)
    if not file.exists():
        raise FileNotFoundError(f"{file} does not exist; {remedy}")
    damaged = f"{file} is damaged or incomplete"
    try:
        with safe_open(str(file), "pt") as f:
            names = f.keys()
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in names}
            aliases = f.metadata() or {}  # tied weights: a left-out name -> kept one
    except Exception as err:  # safetensors raises its own error type for bad headers
        msg = f"{damaged} ({type(err).__name__}: {err}); {remedy}"
        raise CheckpointError(msg) from err
    mismatch = _shape_mismatch(model, shapes, aliases)
    if mismatch:
        raise CheckpointError(
            f"{file} does not fit the model that {config} describes: {mismatch}. The "
            f"weights and the config come from different models; {remedy}"
        )
    try:
        load_model(model, str(file), strict=True)
    except Exception as err:
        msg = f"{damaged} ({type(err).__name__}: {err}); {remedy}"
        raise CheckpointError(msg) from err


def _shape_mismatch(model: nn.Module, shapes: dict, aliases: dict) -> str:
    """What differs between the model's tensors and a file's (empty: nothing)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {
        k: shapes[aliases.get(k, k)] for k in expected if aliases.get(k, k) in shapes
    }
    problems = [
        f"{k} has shape {found[k]} in the file, {shape} in the model"
        for k, shape in expected.items()
        if k in found and found[k] != shape
    ]
    if missing := [k for k in expected if k not in found]:
        problems.append(f"the file lacks {', '.join(missing[:3])}")
    if extra := [k for k in shapes if k not in expected]:
        problems.append(f"the model has no {', '.join(extra[:3])}")
    if len(problems) > 3:
        problems = problems[:3] + [f"and {len(problems) - 3} more"]
    return "; ".join(problems)


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
    # a leftover of a save that was killed (SIGKILL, power cut) is never loaded
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with atomic_files(tmp) as part:  # each file flushed to the disk (fsync)
            save_model(model, str(part("model.safetensors")))  # handles tied weights
            buffer = io.BytesIO()  # torch.save to a file hides a full disk's error
            torch.save(state, buffer)
            part("state.pt").write_bytes(buffer.getvalue())
            part("checkpoint.json").write_text(json.dumps(meta, indent=1))
        os.replace(tmp, root / name)
        with atomic_write(root / LATEST, "w", encoding="utf-8") as f:
            f.write(name + "\n")  # the moment the new checkpoint becomes the one
    except OSError as err:
        if is_disk_full(err) and not isinstance(err, DiskFullError):  # renaming
            raise disk_full_error(root / name, err) from err
        raise
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
    allow_config_change: bool = False,
    restore_rng: bool = True,
) -> dict:
    """Load the latest checkpoint under ``path`` into ``model`` (optimizer, sampler).

    Refuses a checkpoint from a model with other weights (config fields such as
    dropout do not count) and, given ``train_config``, one from a run with other
    training settings unless ``allow_config_change``. Never unpickles arbitrary
    objects. Returns the JSON metadata (step, configs, history).
    """
    folder = checkpoint_folder(path)
    remedy = f"delete {folder} and resume from an earlier checkpoint or start afresh"
    file = folder / "checkpoint.json"
    meta = read_json_file(file, CHECKPOINT_KEYS, CHECKPOINT_KEYS, remedy)
    if not isinstance(meta["step"], int) or meta["step"] < 0:
        raise CheckpointError(f"{file}: 'step' is not a step number: {meta['step']!r}")
    if not isinstance(meta["format"], int) or meta["format"] > CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{file} has format {meta['format']!r}; this code reads format "
            f"{CHECKPOINT_FORMAT} and older (a newer checkpoint: update the course)"
        )
    saved_config = meta["model_config"] or {}
    current = getattr(model, "config", None)
    if dataclasses.is_dataclass(current):
        check_config_fields(saved_config, type(current), file, "model_config")
    if train_config is not None and meta["train_config"] is not None:
        check_config_fields(meta["train_config"], type(train_config), file,
                            "train_config")  # fmt: skip
    diff = config_differences(saved_config, current, WEIGHT_NEUTRAL_FIELDS)
    if diff:
        raise CheckpointError(
            f"checkpoint {folder} was saved from a different model config; "
            f"differences (checkpoint -> model): {'; '.join(diff)}"
        )
    if train_config is not None and not allow_config_change:
        diff = config_differences(
            meta.get("train_config") or {}, train_config, RUN_NEUTRAL_FIELDS
        )
        if diff:
            raise CheckpointError(
                f"checkpoint {folder} was saved by a run with other training "
                f"settings, so resuming would not continue that run: "
                f"{'; '.join(diff)}. {ALLOW_CHANGE_HINT}"
            )
    load_weights(model, folder / "model.safetensors", remedy, str(file))
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
    needed = ["torch_rng"] if restore_rng else []
    needed += ["optimizer"] * (optimizer is not None)
    needed += ["sampler_rng"] * (sampler is not None)
    for key in needed:
        if key not in state:
            raise CheckpointError(
                f"{folder / 'state.pt'} lacks {key!r} (saved without it); {remedy}"
            )
    if sampler is not None and not isinstance(meta["batches_drawn"], int):
        raise CheckpointError(f"{file}: 'batches_drawn' is {meta['batches_drawn']!r}")
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if sampler is not None:
        sampler.generator.set_state(state["sampler_rng"])
        sampler.batches_drawn = meta["batches_drawn"]
    if restore_rng:
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    return meta
