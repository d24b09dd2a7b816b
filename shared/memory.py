"""Where training memory goes: measured on a real step, and estimated from a config.

Training holds four kinds of tensors at its peak (the moment ``backward`` starts):

* parameters — the weights themselves;
* gradients — one per parameter, same dtype;
* optimizer state — AdamW keeps two moments per parameter (``exp_avg``,
  ``exp_avg_sq``) and a step counter;
* activations — the tensors autograd saved during the forward pass because the
  backward pass needs them (a layer's input, a softmax's output, dropout masks...).

``measure_training_memory`` counts each of them on a real model: parameters and
gradients from the tensors, optimizer state from ``optimizer.state``, activations with
``torch.autograd.graph.saved_tensors_hooks`` (each storage counted once, parameters
left out). That works on CPU, CUDA and MPS alike. ``estimate_training_memory`` gives
the same four numbers from a ``GPTConfig`` alone, so it can plan models that do not
fit on this machine (GPT-2 1.5B, 7B, 70B).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from shared.model import GPT, GPTConfig


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


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated before.

    CUDA keeps an allocator counter for this. On the CPU we replay the allocation
    and free events that ``torch.profiler`` records (``profile_memory=True``) in
    time order; if that event list is not available in this PyTorch version, the sum
    of all allocations is returned instead (an upper bound on the peak).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with (
        _quiet_stderr(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        fn()
    try:
        events = [
            e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
        ]
    except AttributeError:  # internal API moved: report total allocation instead
        return sum(max(0, e.self_cpu_memory_usage) for e in prof.key_averages())
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak


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


# --------------------------------------------------------------------------- measured


@dataclass
class MemoryBreakdown:
    """Bytes of each kind of training memory."""

    params: int
    grads: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        """All four together: the memory of one training step at its peak."""
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
    device = idx.device
    model.train()
    optimizer.zero_grad(set_to_none=True)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with saved_tensors(exclude=model) as saved, autocast:
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


# -------------------------------------------------------------------------- estimated

FP32 = 4  # bytes; norms, their statistics, the residual stream and the loss stay fp32


def _bytes_of(dtype: torch.dtype) -> int:
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return torch.finfo(dtype).bits // 8


def parameter_tensors(config: GPTConfig) -> tuple[int, int]:
    """(parameters, parameter tensors) of ``GPT(config)``, counted on ``meta``."""
    n_params, n_tensors, _ = _counts(*dataclasses.astuple(config))
    return n_params, n_tensors


@functools.lru_cache(maxsize=256)
def _counts(*fields) -> tuple[int, int, int]:
    """Parameters, parameter tensors, and one block's matrix elements, for a config
    given as its field values (a tuple can be cached, the dataclass cannot)."""
    with torch.device("meta"):
        model = GPT(GPTConfig(*fields))
    params = list(model.parameters())  # tied weights are listed once
    block = sum(p.numel() for p in model.transformer.h[0].parameters() if p.dim() == 2)
    return sum(p.numel() for p in params), len(params), block


def block_activation_bytes(
    config: GPTConfig, seq_len: int, dtype=torch.float32
) -> dict:
    """Bytes one transformer block saves for backward, per token, by what saves them.

    The rules are those of PyTorch's CPU kernels (checked against
    ``saved_tensors`` in ``tests/test_memory.py``): a Linear layer keeps its input,
    LayerNorm its input and two statistics, the fused attention kernel q, k, v, its
    output and one log-sum-exp per head, GELU its input, dropout a mask. Under
    ``dtype=torch.bfloat16`` (autocast) matmul operands are 2 bytes, while norms and
    the residual stream stay fp32 (so does attention with dropout, which PyTorch's
    CPU autocast runs in fp32).
    """
    c, nh, t = config.n_embd, config.n_head, seq_len
    h = config.hidden_size
    a = _bytes_of(dtype)
    drop = config.dropout > 0
    out = {}
    if config.norm == "layernorm":  # input + mean + rstd, then the next Linear's input
        out["norms"] = 2 * (c * FP32 + 2 * FP32 + c * a)
    else:  # input, rms, x / rms, then the next Linear's input
        out["norms"] = 2 * (c * FP32 + FP32 + c * FP32 + c * a)
    if config.attn_impl == "explicit":  # q, k, v, the T x T weights, the output
        weights = nh * t * a * (3 if drop else 1)  # softmax (+ dropout mask, dropped)
        out["attention"] = 3 * c * a + weights + c * a
    elif drop:  # the fused kernel falls back to PyTorch's math path, run in fp32
        out["attention"] = 3 * c * FP32 + 3 * nh * t * FP32 + c * a
    else:  # flash attention: q, k, v, output and a log-sum-exp per head
        out["attention"] = 3 * c * a + c * a + nh * FP32
    if config.pos_encoding == "rope":
        out["attention"] += 2 * c * a  # the rotated q and k
    ffn = 4 * h * a if config.ffn == "swiglu" else 2 * h * a  # gate, up, ... | in, out
    out["feed-forward"] = ffn
    if drop:
        out["dropout masks"] = 2 * c * a  # after attention and after the FFN
    return out


def block_bytes(
    config: GPTConfig, batch_size: int, seq_len: int, dtype=torch.float32
) -> int:
    """Bytes one block saves for a batch: per-token activations and its constants."""
    t, a = seq_len, _bytes_of(dtype)
    per_token = sum(block_activation_bytes(config, seq_len, dtype).values())
    constants = 0
    if config.attn_impl == "explicit":
        constants += t * t  # the boolean causal mask
    if config.pos_encoding == "rope":
        constants += 8 * t * (config.n_embd // config.n_head)  # cos / sin tables
    if a != FP32:  # autocast keeps a low-precision copy of every matmul weight
        constants += _counts(*dataclasses.astuple(config))[2] * a
    return per_token * batch_size * seq_len + constants


def estimate_activation_bytes(
    config: GPTConfig,
    batch_size: int,
    seq_len: int,
    *,
    dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool | int = False,
) -> int:
    """Bytes autograd saves for backward in one forward pass of ``GPT(config)``.

    ``activation_checkpointing``: ``True`` (every block) or a number of blocks; each
    checkpointed block keeps only its fp32 input.
    """
    tokens = batch_size * seq_len
    c, v, t = config.n_embd, config.vocab_size, seq_len
    n_ckpt = (
        config.n_layer
        if activation_checkpointing is True
        else int(activation_checkpointing)
    )
    a = _bytes_of(dtype)
    one_block = block_bytes(config, batch_size, seq_len, dtype)
    blocks = (config.n_layer - n_ckpt) * one_block
    blocks += n_ckpt * c * FP32 * tokens  # checkpointed blocks keep their input
    # after the blocks: the final norm, the head's input, fp32 log-probabilities, the
    # token ids and targets (int64), the position ids, the embedding dropout mask
    if config.norm == "layernorm":
        final_norm = c * FP32 + 2 * FP32
    else:
        final_norm = 2 * c * FP32 + FP32
    head = tokens * (final_norm + c * a + v * FP32 + 2 * 8) + FP32  # + the mean's 1/N
    if config.pos_encoding == "learned":
        head += t * 8
    if config.dropout > 0:
        head += tokens * c * FP32
    if a != FP32:
        head += v * c * a  # the head's weight, cast
    return blocks + head


def estimate_training_memory(
    config: GPTConfig,
    batch_size: int,
    seq_len: int,
    *,
    dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool | int = False,
) -> dict[str, int]:
    """Bytes of ``params``, ``grads``, ``optimizer`` (AdamW), ``activations`` and
    ``recompute`` of one training step of ``GPT(config)``, and their ``total``.

    Weights, gradients and AdamW's two moments are fp32 (with ``dtype=bfloat16`` the
    forward pass runs under autocast: mixed precision with fp32 master weights), so
    they take 4 + 4 + 8 = 16 bytes per parameter. ``activations`` is what autograd
    saves in the forward pass (:func:`estimate_activation_bytes`); with activation
    checkpointing, the backward pass rebuilds one block's activations at a time, and
    ``recompute`` counts that block, alive on top of the saved tensors.
    """
    n_params, n_tensors = parameter_tensors(config)
    out = {
        "params": n_params * FP32,
        "grads": n_params * FP32,
        "optimizer": 2 * n_params * FP32 + n_tensors * FP32,  # moments + step counts
        "activations": estimate_activation_bytes(
            config, batch_size, seq_len, dtype=dtype,
            activation_checkpointing=activation_checkpointing,
        ),
        "recompute": (
            block_bytes(config, batch_size, seq_len, dtype)
            if activation_checkpointing
            else 0
        ),
    }  # fmt: skip
    out["total"] = sum(out.values())
    return out


# ---------------------------------------------------------------------------- planner


@dataclass
class Plan:
    """How to train ``config`` within a memory budget: the settings and their bytes."""

    micro_batch: int
    grad_accum_steps: int
    activation_checkpointing: bool
    dtype: torch.dtype
    memory: dict[str, int]

    def __str__(self) -> str:
        ckpt = "checkpointing" if self.activation_checkpointing else "no checkpointing"
        return (
            f"micro-batch {self.micro_batch} x {self.grad_accum_steps} accumulation "
            f"steps, {ckpt}, {str(self.dtype).removeprefix('torch.')}: "
            f"{self.memory['total'] / 2**30:.2f} GiB"
        )


def plan_training(
    config: GPTConfig,
    budget_bytes: int,
    *,
    seq_len: int,
    global_batch: int,
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16),
) -> Plan | None:
    """The fastest setting whose estimated memory fits ``budget_bytes``, or None.

    Options are tried from cheapest in time to dearest: precisions in the order of
    ``dtypes`` (put bfloat16 first on hardware where it is faster), then without and
    with activation checkpointing (about one more forward pass), then micro-batches
    from ``global_batch`` down to 1 (only divisors, so that accumulation gives the
    same update as the full batch). Parameters, gradients and AdamW's state do not
    shrink with any of these: when they alone exceed the budget, nothing fits on one
    device (chapter 6 shards them).
    """
    micro_batches = [b for b in range(global_batch, 0, -1) if global_batch % b == 0]
    for dtype in dtypes:
        for ckpt in (False, True):
            for micro in micro_batches:
                memory = estimate_training_memory(
                    config, micro, seq_len, dtype=dtype, activation_checkpointing=ckpt
                )
                if memory["total"] <= budget_bytes:
                    return Plan(micro, global_batch // micro, ckpt, dtype, memory)
    return None
