"""Training memory measured on a real step: what autograd saves, the peak, and the
timeline of bytes allocated from ``zero_grad`` to ``optimizer.step``.

Training holds four kinds of tensors: parameters; gradients (one per parameter, same
dtype); optimizer state (AdamW: ``exp_avg``, ``exp_avg_sq`` and a step counter per
parameter); and activations, the tensors autograd saved in the forward pass because
the backward pass needs them. ``measure_training_memory`` counts each kind on a real
model, activations with ``torch.autograd.graph.saved_tensors_hooks``.

Those four are not the step's peak. The peak also holds what the step allocates and
frees again: the logits and their log-probabilities, the gradients of both at the
start of backward, a block's intermediate gradients, the optimizer's temporaries.
``measure_peak_memory`` measures that peak and ``training_timeline`` shows how it
is reached (forward rising, backward falling, the optimizer's spike). On the CPU
both replay the allocation and free events of ``torch.profiler``, validated against
``shared.memory.estimate_peak_memory`` in ``tests/test_memory.py``; on CUDA the peak
comes from ``torch.cuda.max_memory_allocated`` and the timeline from the profiler's
CUDA memory events (neither validated on a GPU yet).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

PHASES = ("zero_grad", "forward", "backward", "optimizer")  # see training_step


@dataclass
class SavedTensors:
    """What autograd kept for backward: bytes and tensor count (storages once)."""

    bytes: int = 0
    count: int = 0


@contextlib.contextmanager
def saved_tensors(exclude: nn.Module | None = None) -> Iterator[SavedTensors]:
    """Count the bytes autograd saves for backward inside the ``with`` block.

    A tensor is counted once per storage (views of one buffer share it), and the
    parameters of ``exclude`` are left out: they are memory of their own, not
    activations.
    """
    skip = set()
    if exclude is not None:
        skip = {p.untyped_storage().data_ptr() for p in exclude.parameters()}
    seen: set[int] = set()
    result = SavedTensors()

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip and ptr not in seen:
            seen.add(ptr)
            result.bytes += storage.nbytes()
            result.count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result


# --------------------------------------------------------------------- the timeline


@dataclass
class MemoryTimeline:
    """Bytes allocated while a function ran, above ``baseline`` (what was allocated
    before it: 0 for ``memory_timeline``, the weights, AdamW's state and the batch
    for ``training_timeline``).

    ``times_ns[i]`` (nanoseconds since the first event) is when ``bytes[i]`` became
    the allocated total; ``phases`` maps the name of each outermost
    ``record_function`` range (``training_step`` opens ``PHASES``) to its (start,
    end) on the same clock.
    """

    times_ns: list[int]
    bytes: list[int]
    phases: dict[str, tuple[int, int]]
    baseline: int = 0

    @property
    def peak(self) -> int:
        """The most bytes allocated at once, above the baseline (0 if none)."""
        return max(self.bytes, default=0)

    @property
    def peak_phase(self) -> str | None:
        """The phase during which the peak happened (None outside every phase)."""
        if not self.bytes:
            return None
        at = self.times_ns[self.bytes.index(self.peak)]
        inside = [n for n, (s, e) in self.phases.items() if s <= at <= e]
        return inside[0] if inside else None


def memory_timeline(fn: Callable[[], object], device: torch.device) -> MemoryTimeline:
    """Run ``fn()`` under ``torch.profiler`` and return its allocation timeline.

    Tensors that existed before ``fn`` and are freed inside it are not seen (the
    profiler records no free for a block allocated before it started), so free them
    first: ``measure_peak_memory`` sets the gradients to None before profiling.
    """
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with _quiet_stderr(), profile(activities=activities, profile_memory=True) as prof:
        fn()
    events = list(prof.profiler.kineto_results.events())
    memory = sorted(
        (
            e
            for e in events
            if e.name() == "[memory]" and e.device_type().name == device.type.upper()
        ),
        key=lambda e: e.start_ns(),
    )
    ranges = []  # the outermost ranges: a phase, not the optimizer's own inside it
    for e in sorted(events, key=lambda e: e.start_ns()):
        if e.is_user_annotation() and not (
            ranges and e.end_ns() <= ranges[-1].end_ns()
        ):
            ranges.append(e)
    t0 = min((e.start_ns() for e in memory + ranges), default=0)
    times, allocated, current = [], [], 0
    for e in memory:
        current += e.nbytes()
        times.append(e.start_ns() - t0)
        allocated.append(current)
    phases = {e.name(): (e.start_ns() - t0, e.end_ns() - t0) for e in ranges}
    return MemoryTimeline(times, allocated, phases)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated before.

    CUDA keeps an allocator counter for this. On the CPU we replay the allocation
    and free events that ``torch.profiler`` records (``profile_memory=True``) in
    time order (``memory_timeline``).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return memory_timeline(fn, device).peak


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler's C++ warnings, which go to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


# -------------------------------------------------------------- the kinds of memory


@dataclass
class MemoryBreakdown:
    """Bytes of each kind of training memory."""

    params: int
    grads: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        """All four together (the step's peak is higher: ``measure_peak_memory``)."""
        return self.params + self.grads + self.optimizer + self.activations

    def as_dict(self) -> dict[str, int]:
        """The four kinds and their total."""
        return {**dataclasses.asdict(self), "total": self.total}


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among ``tensors`` (tied weights counted once)."""
    storages = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in ``optimizer.state`` (AdamW: both moments and the step counts)."""
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values())


def _autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def measure_training_memory(
    model: nn.Module,
    idx: torch.Tensor,
    targets: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    dtype: torch.dtype = torch.float32,
) -> MemoryBreakdown:
    """Run one training step and count each kind of memory it holds.

    Activations are the bytes autograd saved in the forward pass (parameters left
    out); ``dtype=torch.bfloat16`` runs the forward pass under autocast. The
    optimizer takes a real step, so its state exists when it is counted.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with saved_tensors(exclude=model) as saved, _autocast(idx.device, dtype):
        _, loss = model(idx, targets)
    loss.backward()
    optimizer.step()
    params = list(model.parameters())
    return MemoryBreakdown(
        params=tensor_bytes(params),
        grads=tensor_bytes(p.grad for p in params if p.grad is not None),
        optimizer=optimizer_state_bytes(optimizer),
        activations=saved.bytes,
    )


# ----------------------------------------------------------------------- the peak


def training_step(
    model: nn.Module,
    idx: torch.Tensor,
    targets: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    dtype: torch.dtype = torch.float32,
    keep_logits: bool = False,
) -> Callable[[], torch.Tensor]:
    """One full training step as a function, its phases labelled for the profiler.

    ``zero_grad`` (to None), ``forward`` (under autocast for bfloat16), ``backward``,
    ``optimizer`` (``optimizer.step()``): the names in ``PHASES``. With
    ``keep_logits`` the logits stay referenced until the step ends, as when a loop
    writes ``logits, loss = model(x, y)``; otherwise only the loss is kept.
    """

    def step() -> torch.Tensor:
        with record_function("zero_grad"):
            optimizer.zero_grad(set_to_none=True)
        with record_function("forward"), _autocast(idx.device, dtype):
            logits, loss = model(idx, targets)
            if not keep_logits:
                del logits
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            optimizer.step()
        return loss.detach()

    return step


def resting_bytes(
    model: nn.Module, optimizer: torch.optim.Optimizer, *batch: torch.Tensor
) -> int:
    """What a training step starts from: weights and buffers, the optimizer's state
    and the batch (gradients set to None)."""
    tensors = [*model.parameters(), *model.buffers(), *batch]
    return tensor_bytes(tensors) + optimizer_state_bytes(optimizer)


def training_timeline(
    model: nn.Module,
    idx: torch.Tensor,
    targets: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    dtype: torch.dtype = torch.float32,
    keep_logits: bool = False,
) -> MemoryTimeline:
    """The allocation timeline of one ``training_step``, its phases marked, above a
    ``baseline`` of ``resting_bytes`` (the gradients are set to None first)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)  # frees made before profiling are unseen
    step = training_step(
        model, idx, targets, optimizer, dtype=dtype, keep_logits=keep_logits
    )
    timeline = memory_timeline(step, idx.device)
    timeline.baseline = resting_bytes(model, optimizer, idx, targets)
    return timeline


def measure_peak_memory(
    model: nn.Module,
    idx: torch.Tensor,
    targets: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    dtype: torch.dtype = torch.float32,
    keep_logits: bool = False,
) -> int:
    """The peak of one training step: the bytes alive at its worst moment.

    Defined as ``resting_bytes`` (weights, buffers, AdamW's state, the batch) plus
    the most that ``training_step`` (``zero_grad`` to None, forward, backward,
    ``optimizer.step()``) allocates above them at any instant: the activations, the
    gradients as they are produced, the loss's and the optimizer's temporaries. Run
    one step first so that AdamW's state exists: before it, a peak that falls in the
    optimizer phase counts the state it creates twice. CPU: the profiler's
    allocation events (``training_timeline``; validated against the estimate). CUDA:
    ``max_memory_allocated``, which also counts any other tensor on the device.
    """
    device = idx.device
    if device.type != "cuda":
        timeline = training_timeline(
            model, idx, targets, optimizer, dtype=dtype, keep_logits=keep_logits
        )
        return timeline.baseline + timeline.peak
    model.train()
    optimizer.zero_grad(set_to_none=True)
    step = training_step(
        model, idx, targets, optimizer, dtype=dtype, keep_logits=keep_logits
    )
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)
