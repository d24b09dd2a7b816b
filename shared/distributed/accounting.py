"""What each strategy sends and holds: collectives counted as they run, the ring
formulas for the bytes per step, and the memory of the model states per device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# bytes each rank SENDS for a collective over a buffer of S bytes on N ranks, with the
# bandwidth-optimal (ring) algorithms: all-reduce = reduce-scatter + all-gather
RING_FACTOR = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "broadcast": lambda n: (n - 1) / n,
    # a reduce to one root: averaged over the ranks, as a broadcast run backwards; N
    # reduces of S/N bytes (one per root, as DeepSpeed's ZeRO does) = a reduce-scatter
    "reduce": lambda n: (n - 1) / n,
    "send": lambda n: 1.0,
}

# dispatcher ops of torch.distributed -> (kind, index of the argument of full size S)
_OPS = {
    "c10d.allreduce_": ("all_reduce", 0),
    "c10d.allreduce_coalesced_": ("all_reduce", 0),
    "c10d._allgather_base_": ("all_gather", 0),
    "c10d.allgather_": ("all_gather", 0),
    "c10d.allgather_into_tensor_coalesced_": ("all_gather", 0),
    "c10d._reduce_scatter_base_": ("reduce_scatter", 1),
    "c10d.reduce_scatter_": ("reduce_scatter", 1),
    "c10d.reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "c10d.broadcast_": ("broadcast", 0),
    "c10d.reduce_": ("reduce", 0),
    "c10d.send": ("send", 0),
    "_c10d_functional.all_reduce": ("all_reduce", 0),
    "_c10d_functional.all_reduce_": ("all_reduce", 0),
    "_c10d_functional.all_gather_into_tensor": ("all_gather", None),
    "_c10d_functional.reduce_scatter_tensor": ("reduce_scatter", 0),
}


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


@dataclass
class CollectiveLog:
    """Collectives seen by ``count_collectives``: kind, payload bytes S, and the bytes
    this rank sends by the ring formula."""

    world_size: int
    calls: list[tuple[str, int]] = field(default_factory=list)

    def payload(self, kind: str | None = None) -> int:
        return sum(s for k, s in self.calls if kind in (None, k))

    def sent(self) -> float:
        n = self.world_size
        return sum(RING_FACTOR[k](n) * s for k, s in self.calls)

    def summary(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for k, s in self.calls:
            entry = out.setdefault(k, {"calls": 0, "bytes": 0})
            entry["calls"] += 1
            entry["bytes"] += s
        return out


class count_collectives(TorchDispatchMode):  # noqa: N801 (used as a context manager)
    """Record every collective this process starts: ``with count_collectives(N) as
    log: ...``. It sees ``torch.distributed`` calls and DTensor's functional ones."""

    def __init__(self, world_size: int) -> None:
        super().__init__()
        self.log = CollectiveLog(world_size)

    def __enter__(self) -> CollectiveLog:
        super().__enter__()
        return self.log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = f"{func.namespace}.{func._schema.name.split('::')[-1]}"
        if name in _OPS:
            kind, index = _OPS[name]
            if index is None:  # functional all-gather: output = input x group size
                size = _nbytes(args[0]) * int(args[1])
            else:
                size = _nbytes(args[index])
            self.log.calls.append((kind, size))
        return func(*args, **(kwargs or {}))


def bytes_per_step(strategy: str, param_bytes: int, world_size: int) -> float:
    """Bytes each rank sends per optimizer step for the parameters (ring formulas).

    DDP and hand-written data parallelism: one all-reduce of the gradients. ZeRO-1/2:
    reduce-scatter the gradients, all-gather the updated parameters. FSDP2 / ZeRO-3:
    all-gather the parameters for the forward pass and again for the backward pass,
    reduce-scatter the gradients.
    """
    n = world_size
    passes = {
        "manual": [("all_reduce", 1)],
        "ddp": [("all_reduce", 1)],
        "zero1": [("reduce_scatter", 1), ("all_gather", 1)],
        "zero2": [("reduce_scatter", 1), ("all_gather", 1)],
        "fsdp2": [("all_gather", 2), ("reduce_scatter", 1)],
        "zero3": [("all_gather", 2), ("reduce_scatter", 1)],
    }
    if strategy not in passes:
        raise ValueError(f"no parameter-traffic formula for {strategy!r}")
    return sum(RING_FACTOR[k](n) * times * param_bytes for k, times in passes[strategy])


# what each strategy splits over N devices (ZeRO paper, Rajbhandari et al. 2020)
SHARDED = {
    "ddp": (),
    "zero1": ("optimizer",),
    "zero2": ("optimizer", "grads"),
    "zero3": ("optimizer", "grads", "params"),
    "fsdp2": ("optimizer", "grads", "params"),
}


def model_state_bytes(
    n_params: int, n_devices: int, strategy: str, k: int = 12
) -> dict[str, float]:
    """Bytes per device of parameters, gradients and optimizer state (no activations).

    Mixed-precision Adam, as in the ZeRO paper: 2-byte parameters and gradients and
    ``k`` = 12 bytes of optimizer state per parameter (an fp32 master copy and two
    fp32 moments). Each strategy divides the states it shards by ``n_devices``.
    """
    if strategy not in SHARDED:
        raise ValueError(f"strategy must be one of {sorted(SHARDED)}, got {strategy!r}")
    full = {"params": 2.0 * n_params, "grads": 2.0 * n_params,
            "optimizer": float(k * n_params)}  # fmt: skip
    out = {
        kind: size / n_devices if kind in SHARDED[strategy] else size
        for kind, size in full.items()
    }
    out["total"] = sum(out.values())
    return out
