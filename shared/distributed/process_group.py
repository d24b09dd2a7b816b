"""Who this process is in a distributed job, joining its process group, and leaving it.

``torchrun`` (or Slurm, or a Kubernetes pod) starts the processes and describes the
job in environment variables; a plain ``python`` run is a world of one.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from shared.device import get_device

# the flat all-gather and reduce-scatter (one buffer in, one out): torch 2.13 names them
# *_single, older releases *_tensor (the same dispatcher ops, so the counts agree)
all_gather_flat = (
    getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
)
reduce_scatter_flat = (
    getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
)


@dataclass
class DistEnv:
    """Who this process is: its rank among ``world_size`` and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None, timeout: float = 600) -> DistEnv:
    """Join the process group that ``torchrun`` described in the environment.

    ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT``; a plain ``python`` run is a world of one. NCCL on CUDA (one GPU
    per process, by local rank), gloo on CPU. A collective that waits more than
    ``timeout`` seconds for another rank (dead, or frozen) raises instead of hanging:
    10 minutes, NCCL's default, where gloo's own is 30.
    """
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = get_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    elif dev.type == "mps":  # no MPS collectives: CPU processes
        dev = torch.device("cpu")
    if "RANK" in os.environ and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        kwargs["timeout"] = timedelta(seconds=timeout)
        dist.init_process_group(backend, rank=rank, world_size=world, **kwargs)
    return DistEnv(rank, world, local_rank, dev)


def shutdown() -> None:
    """Leave the process group and end the process (every rank, as its last call).

    The process ends here with ``os._exit``: with torch 2.13's gloo on CPU, about
    one exit in thirty aborted ("terminate called without an active exception")
    while C++ objects were torn down after the group was destroyed.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
