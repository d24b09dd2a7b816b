"""The run mode: one knob (``BOOK_MODE``) that sizes every workload in the course."""

from __future__ import annotations

import os
from typing import TypeVar

MODES = ("smoke", "laptop", "gpu")
DEFAULT_MODE = "laptop"

T = TypeVar("T")


def get_mode() -> str:
    """The run mode from ``BOOK_MODE``: ``smoke``, ``laptop`` (default) or ``gpu``."""
    raw = os.environ.get("BOOK_MODE", "").strip().lower()
    if not raw:
        return DEFAULT_MODE
    if raw not in MODES:
        raise ValueError(
            f"BOOK_MODE={os.environ['BOOK_MODE']!r} is not a run mode. "
            f"Use one of: {', '.join(MODES)} (e.g. `export BOOK_MODE=smoke`)."
        )
    return raw


def by_mode(*, smoke: T, laptop: T, gpu: T | None = None) -> T:
    """Pick the value for the current mode; ``gpu`` falls back to ``laptop``."""
    mode = get_mode()
    if mode == "smoke":
        return smoke
    if mode == "gpu" and gpu is not None:
        return gpu
    return laptop
