"""Activation checkpointing by hand: keep a function's inputs, drop everything it
computes in between, and run it again in backward.

``checkpoint(function, *args)`` runs ``function`` without recording a graph (so no
activation is saved), keeping only the tensors in ``args`` and the random-number
state. In backward it restores that state (dropout draws the same mask) and the
forward's autocast (bf16 stays bf16), runs the function again with gradients on,
and backpropagates through this fresh graph: the same operations in the same order,
so the gradients are bit-identical to storing the activations, and to
``torch.utils.checkpoint``. The price is a second forward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch


def _devices_of(tensors: list[torch.Tensor]) -> list[torch.device]:
    """The accelerators whose random state the function may use (CPU always is)."""
    return sorted({t.device for t in tensors if t.device.type == "cuda"}, key=str)


class Recompute(torch.autograd.Function):
    """``Recompute.apply(function, *args)``: ``function(*args)``, recomputed in
    backward. ``function`` returns one tensor; ``args`` may mix tensors and others.
    As with PyTorch's reentrant checkpoint, a tensor in ``args`` must require grad
    (a block's input does), or backward never reaches the function's parameters."""

    @staticmethod
    def forward(ctx, function: Callable, *args) -> torch.Tensor:
        is_tensor = [torch.is_tensor(a) for a in args]
        tensors = [a for a in args if torch.is_tensor(a)]
        ctx.function, ctx.is_tensor = function, is_tensor
        ctx.others = [None if t else a for a, t in zip(args, is_tensor, strict=True)]
        ctx.devices = _devices_of(tensors)
        ctx.cpu_rng = torch.get_rng_state()
        # autocast is off when backward runs: remember it, to recompute in bf16 too
        ctx.autocast = {
            kind: (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
            for kind in ("cpu", "cuda")
        }
        ctx.cuda_rng = [torch.cuda.get_rng_state(d) for d in ctx.devices]
        ctx.save_for_backward(*tensors)
        with torch.no_grad():  # no graph: the intermediate activations are freed
            return function(*args)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        saved = iter(ctx.saved_tensors)
        inputs, args = [], []
        for is_tensor, other in zip(ctx.is_tensor, ctx.others, strict=True):
            if not is_tensor:
                args.append(other)
                continue
            x = next(saved)
            leaf = x.detach().requires_grad_(x.requires_grad)
            inputs.append(leaf)
            args.append(leaf)
        # the forward's random state, so dropout drops the same units again
        with torch.random.fork_rng(devices=ctx.devices):
            torch.set_rng_state(ctx.cpu_rng)
            for device, state in zip(ctx.devices, ctx.cuda_rng, strict=True):
                torch.cuda.set_rng_state(state, device)
            with contextlib.ExitStack() as stack:
                for kind, (enabled, dtype) in ctx.autocast.items():
                    if enabled:
                        stack.enter_context(torch.autocast(kind, dtype=dtype))
                stack.enter_context(torch.enable_grad())
                output = ctx.function(*args)
        torch.autograd.backward(output, grad_output)  # parameters get their .grad here
        grads = iter(x.grad if x.requires_grad else None for x in inputs)
        return (None, *(next(grads) if t else None for t in ctx.is_tensor))


def checkpoint(function: Callable, *args) -> torch.Tensor:
    """``function(*args)`` keeping only ``args``; run again in backward."""
    return Recompute.apply(function, *args)
