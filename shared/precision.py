"""Numeric precision of the forward pass: ``autocast`` to bfloat16 or plain float32,
one switch for training (``shared.train``) and evaluation."""

from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device, dtype: str):
    """Forward-pass precision: ``"float32"`` (no-op) or ``"bfloat16"`` autocast."""
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype != "bfloat16":
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', not {dtype!r}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
