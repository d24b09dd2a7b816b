"""Device choice (CUDA, Apple MPS, CPU), seeding, and a summary of the machine."""

from __future__ import annotations

import os
import platform
import random

import numpy as np
import torch

DEVICE_TYPES = ("cpu", "cuda", "mps")


def get_device(prefer: str | None = None) -> torch.device:
    """Best available device: CUDA, then Apple MPS, then CPU.

    ``prefer`` (or the ``BOOK_DEVICE`` environment variable) forces one: ``cpu``,
    ``cuda``, ``cuda:N`` or ``mps``.
    """
    source = "device" if prefer else "BOOK_DEVICE"
    choice = (prefer or os.environ.get("BOOK_DEVICE", "")).strip().lower()
    if not choice:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(choice)
    except RuntimeError:
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise ValueError(
            f"{source}={choice!r} is not a device; use one of "
            f"{', '.join(DEVICE_TYPES)} (or cuda:N)"
        )
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": _mps_available(),
    }
    if not available[device.type]:
        usable = [t for t in DEVICE_TYPES if available[t]]
        raise RuntimeError(
            f"{source}={choice!r}, but {device.type.upper()} is not available on "
            f"this machine; available: {', '.join(usable)}"
        )
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"{source}={choice!r}, but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    return device


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and PyTorch (all devices); return a seeded CPU generator."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA and MPS generators
    return torch.Generator().manual_seed(seed)


def describe_environment() -> dict[str, str]:
    """What the reader is running: versions, cores, threads, accelerator, run mode."""
    from shared.mode import get_mode

    device = get_device()
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpu cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "device": str(device),
        "BOOK_MODE": get_mode(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.1f} GiB"
        info["bf16 supported"] = str(torch.cuda.is_bf16_supported())
    return info
