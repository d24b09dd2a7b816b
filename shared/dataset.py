"""From token ids to training batches: split, sliding windows, DataLoader, random
batches for the training loop, id cache."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from shared.data import artefact_dir, atomic_write

S = TypeVar("S", bound=Sequence)


def train_val_split(data: S, val_fraction: float = 0.1) -> tuple[S, S]:
    """Split by position (nanoGPT style): the first part trains, the last validates.

    Works on strings, lists, arrays and tensors. A positional split (not a random one)
    keeps validation text unseen: random windows would overlap the training windows.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction}")
    n_train = int(len(data) * (1.0 - val_fraction))
    return data[:n_train], data[n_train:]


def _as_long_tensor(ids) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        t = ids
    else:
        arr = np.asarray(ids)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"token ids must be integers; got dtype {arr.dtype}")
        t = torch.from_numpy(arr.astype(np.int64, copy=False))
    if t.ndim != 1:
        raise ValueError(f"token ids must be 1-D; got shape {tuple(t.shape)}")
    return t.long()


class SlidingWindowDataset(Dataset):
    """Windows of ``context_length`` ids every ``stride`` ids; targets shifted by one.

    Item ``i`` is ``(x, y)`` with ``x = ids[s : s + T]``, ``y = ids[s + 1 : s + T + 1]``
    and ``s = i * stride``. ``stride == context_length`` gives non-overlapping windows;
    a smaller stride gives overlapping ones (more, correlated examples).
    """

    def __init__(self, ids, context_length: int, stride: int | None = None) -> None:
        self.ids = _as_long_tensor(ids)
        self.context_length = int(context_length)
        self.stride = self.context_length if stride is None else int(stride)
        if self.context_length < 1 or self.stride < 1:
            raise ValueError("context_length and stride must be positive")
        if len(self.ids) < self.context_length + 1:
            raise ValueError(
                f"{len(self.ids)} ids are too few for one window of context_length "
                f"{self.context_length} (a window needs context_length + 1 ids)"
            )

    def __len__(self) -> int:
        return (len(self.ids) - self.context_length - 1) // self.stride + 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        s = i * self.stride
        chunk = self.ids[s : s + self.context_length + 1]
        return chunk[:-1], chunk[1:]


def create_dataloader(
    ids,
    batch_size: int,
    context_length: int,
    stride: int | None = None,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 0,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """A DataLoader of ``(x, y)`` batches of shape ``(batch_size, context_length)``."""
    dataset = SlidingWindowDataset(ids, context_length, stride)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        generator=generator,
    )


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


def _tokenizer_key(tokenizer) -> str:
    fingerprint = getattr(tokenizer, "fingerprint", None)
    if callable(fingerprint):
        return f"{type(tokenizer).__name__}-{fingerprint()}"
    # a tokenizer without a fingerprint: identify it by how it encodes a probe text
    probe = "The quick brown fox, 1234 - unicode!\n\n  x"
    ids = tokenizer.encode(probe)
    digest = hashlib.sha256(repr((tokenizer.vocab_size, ids)).encode()).hexdigest()
    return f"{type(tokenizer).__name__}-{digest[:16]}"


def token_ids_cached(tokenizer, text: str, name: str) -> np.ndarray:
    """Encode ``text`` once and cache the ids under ``data/cache/tokens/`` (.npy).

    The file name holds ``name``, the tokenizer's fingerprint and the text's hash, so a
    different tokenizer or text never reads stale ids. ids are ``uint16`` when the
    vocabulary fits (half the disk and memory), else ``int32``.
    """
    text_hash = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    path = (
        artefact_dir()
        / "tokens"
        / f"{name}-{_tokenizer_key(tokenizer)}-{text_hash}.npy"
    )
    if path.exists():
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError):
            path.unlink()  # damaged cache: encode again
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    ids = np.asarray(tokenizer.encode(text), dtype=dtype)
    _save_atomic(path, ids)
    return ids


def _save_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_write(path) as f:
        np.save(f, array, allow_pickle=False)
