"""Data parallelism by hand: each rank's share of every batch, one all-reduce of the
gradients, and the global gradient norm (also over sharded gradients) for clipping.

PyTorch's DDP and FSDP2 do the same with buckets and shards; these functions are the
``manual`` strategy of chapter 6 and the pieces the other strategies share.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn


def rank_batches(
    ids, context_length: int, micro_batch: int, num_replicas: int, rank: int, seed: int
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro-batches of non-overlapping windows, forever, epoch by epoch.

    ``DistributedSampler`` deals one shuffled order of windows out to the ranks (rank
    r takes every ``num_replicas``-th one), so micro-batch k of all ranks together
    holds the same windows as micro-batch k of a single process with
    ``num_replicas * micro_batch`` rows: the same global batch.
    """
    from torch.utils.data import DataLoader, DistributedSampler

    from shared.dataset import SlidingWindowDataset

    data = SlidingWindowDataset(ids, context_length)
    sampler = DistributedSampler(
        data, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
        drop_last=True,
    )  # fmt: skip
    loader = DataLoader(data, batch_size=micro_batch, sampler=sampler, drop_last=True)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)  # a new order every pass over the data
        yield from loader
        epoch += 1


def allreduce_gradients(model: nn.Module, world_size: int) -> None:
    """Data parallelism by hand: sum every gradient over the ranks, divide by N.

    After it, every rank holds the gradient of the global batch's mean loss, so the
    identical optimizer steps keep the replicas identical. (DDP does the same in
    ~25 MB buckets, overlapped with the backward pass.)
    """
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world_size)


def broadcast_parameters(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters to every rank (replicas must start equal)."""
    with torch.no_grad():
        for p in model.parameters():
            dist.broadcast(p.data, src)


def grad_norm(parameters: Iterable[nn.Parameter]) -> torch.Tensor:
    """The global gradient norm, also when gradients are sharded DTensors.

    Plain gradients are whole on every rank: their norm needs no communication. With
    DTensors (FSDP2, tensor parallelism), each rank squares and sums what it holds,
    weighting a tensor held in ``c`` identical copies (replicated over part of the
    mesh, or a plain tensor on every rank) by ``1/c`` so it counts once, and ONE
    scalar all-reduce over all ranks adds the sums: one call per step, where a norm
    per tensor would cost one all-reduce for each sharded tensor. (Assumes, as every
    strategy of chapter 6 but the pipeline, that all ranks share every parameter.)
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g) for g in grads])
        )
    world = dist.get_world_size()
    total = None
    for g in grads:
        if isinstance(g, DTensor):
            # the norm of this rank's piece, "partial" over the mesh dimensions the
            # gradient is split along (DTensor tracks them, FSDP's strided shards too)
            norm = torch.linalg.vector_norm(g)
            pieces = 1
            for size, placement in zip(norm.device_mesh.shape, norm.placements,
                                       strict=True):  # fmt: skip
                pieces *= size if placement.is_partial() else 1
            square = norm.to_local().double().pow(2) * (pieces / world)  # 1/copies
        else:  # whole, the same on every rank
            square = torch.linalg.vector_norm(g).double().pow(2) / world
        total = square if total is None else total + square
    dist.all_reduce(total)
    return total.sqrt().to(grads[0].dtype)


def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale gradients so their global norm is at most ``max_norm`` (as PyTorch's
    ``clip_grad_norm_``, for any mix of sharded and plain gradients)."""
    parameters = list(parameters)  # two passes: a generator would be used up by one
    total = grad_norm(parameters)
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in parameters:
        if p.grad is not None:
            p.grad.mul_(scale.to(p.grad.dtype))
    return total
