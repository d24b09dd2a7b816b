"""Training on several processes: set-up, launching, the communication each strategy
needs, and the pieces that split a ``GPT`` across processes (chapter 06).

Everything works on CPU processes over gloo (a laptop) and on GPUs over NCCL: the
backend follows the device. Strategies themselves (DDP, FSDP2, tensor and pipeline
parallelism, DeepSpeed ZeRO) are driven by
``chapters/06_distributed_training/train_distributed.py``; this module holds what that
script, the notebook and the tests share.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from shared.device import get_device

# ------------------------------------------------------------------------------- set-up


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


def init_distributed(device: str | None = None) -> DistEnv:
    """Join the process group that ``torchrun`` described in the environment.

    ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT``; a plain ``python`` run is a world of one. NCCL on CUDA (one GPU
    per process, by local rank), gloo on CPU.
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


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (for rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(
    script: str | Path, args: Sequence[str] = (), nproc: int = 2
) -> list[str]:
    """The ``torchrun`` command line for ``script`` on this machine (``--standalone``).

    Several machines need a rendezvous instead: see ``launch/two_agents.sh`` and
    ``launch/train.sbatch`` in chapter 6.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return cmd + [f"--nproc_per_node={nproc}", str(script), *map(str, args)]


_ERROR = re.compile(r"Error|Traceback|terminate called|what\(\)|Abort")


def launch(
    script: str | Path,
    args: Sequence[str] = (),
    nproc: int = 2,
    threads: int = 1,
    echo: Callable[[str], None] | None = print,
    timeout: float = 900,
    env: dict | None = None,
) -> list[str]:
    """Run ``script`` under ``torchrun`` with ``nproc`` processes; stream its log.

    A notebook cannot hand its own functions to new processes, so distributed code
    lives in a script and the notebook launches it. ``nproc=0`` runs plain
    ``python`` (one process, no process group). ``threads`` sets ``OMP_NUM_THREADS``
    per process. Returns the log lines; raises with the log's tail on failure.
    """
    if nproc == 0:
        cmd = [sys.executable, str(script), *map(str, args)]
    else:
        cmd = torchrun_command(script, args, nproc)
    full_env = os.environ | {"OMP_NUM_THREADS": str(threads)} | (env or {})
    full_env["PYTHONUNBUFFERED"] = "1"
    lines: list[str] = []
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env
    ) as proc:
        watchdog = threading.Timer(timeout, proc.kill)  # a hung collective, say
        watchdog.start()
        try:
            for line in proc.stdout:  # type: ignore[union-attr]
                lines.append(line.rstrip("\n"))
                if echo is not None:
                    echo(lines[-1])
            code = proc.wait()
        finally:
            timed_out = not watchdog.is_alive()
            watchdog.cancel()
    if timed_out:
        raise TimeoutError(f"{script} ran over {timeout} s and was stopped")
    if code != 0:
        # the ranks' own errors come before torchrun's summary: keep both
        errors = [ln for ln in lines if _ERROR.search(ln)][:20]
        text = "\n".join([*errors, "...", *lines[-30:]] if errors else lines[-30:])
        raise RuntimeError(f"{Path(script).name} failed (exit {code}):\n{text}")
    return lines


# --------------------------------------------------------------------------------- data


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


# ------------------------------------------------------------------------ data parallel


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

    A DTensor's norm is computed shard by shard and combined with one scalar
    all-reduce, so no full gradient is gathered.
    """
    from torch.distributed.tensor import DTensor

    squares = []
    for p in parameters:
        if p.grad is None:
            continue
        n = torch.linalg.vector_norm(p.grad)
        if isinstance(n, DTensor):
            n = n.full_tensor()
        squares.append(n.pow(2))
    return torch.stack(squares).sum().sqrt()


def clip_gradients(parameters: Sequence[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale gradients so their global norm is at most ``max_norm`` (as PyTorch's
    ``clip_grad_norm_``, for any mix of sharded and plain gradients)."""
    total = grad_norm(parameters)
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in parameters:
        if p.grad is not None:
            p.grad.mul_(scale.to(p.grad.dtype))
    return total


# ---------------------------------------------------------------------- tensor parallel


def qkv_rows_by_rank(n_embd: int, n_head: int, tp: int) -> torch.Tensor:
    """Row order of ``c_attn`` that gives each of ``tp`` ranks its own heads' q, k, v.

    ``c_attn`` stacks [q | k | v], each ``n_embd`` rows of ``n_head`` heads. A column
    split into ``tp`` equal chunks would hand rank 0 all of q and half of k; reordered
    as [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] (q_r: the heads of rank r), chunk r is
    exactly what rank r's heads need. (Megatron-LM keeps its fused QKV interleaved
    by head group for the same reason.)
    """
    if n_head % tp:
        raise ValueError(f"n_head={n_head} is not divisible by tp={tp}")
    per_rank = n_embd // tp
    rows = [
        torch.arange(part * n_embd + r * per_rank, part * n_embd + (r + 1) * per_rank)
        for r in range(tp)
        for part in range(3)
    ]
    return torch.cat(rows)


@torch.no_grad()
def permute_qkv(model: nn.Module, tp: int, inverse: bool = False) -> None:
    """Reorder (or restore) every block's ``c_attn`` rows for ``tp`` ranks, in place."""
    cfg = model.config
    order = qkv_rows_by_rank(cfg.n_embd, cfg.n_head, tp)
    if inverse:
        order = torch.argsort(order)
    for block in model.transformer.h:
        lin = block.attn.c_attn
        lin.weight.copy_(lin.weight[order])
        if lin.bias is not None:
            lin.bias.copy_(lin.bias[order])


def tensor_parallelize(model: nn.Module, mesh) -> nn.Module:
    """Megatron-style tensor parallelism with DTensor, in place.

    Per block: ``c_attn`` and ``c_fc`` split by output columns (each rank computes
    its own heads / hidden units), ``c_proj`` by input rows (each rank's partial sum
    is all-reduced). Two all-reduces forward, two backward, per block. Embeddings,
    norms and the head stay replicated.
    """
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    tp = mesh.size()
    permute_qkv(model, tp)
    plan = {
        "attn.c_attn": ColwiseParallel(),
        "attn.c_proj": RowwiseParallel(),
        "mlp.c_fc": ColwiseParallel(),
        "mlp.c_proj": RowwiseParallel(),
    }
    for block in model.transformer.h:
        parallelize_module(block, mesh, plan)
        block.attn.n_head //= tp  # each rank reshapes its slice into its own heads
        block.attn.n_embd //= tp
    return model


def full_state_dict(model: nn.Module, tp: int = 1) -> dict[str, torch.Tensor]:
    """Every parameter whole (sharded DTensors gathered), under the GPT's own names.

    Collective: every rank must call it. ``tp`` undoes ``tensor_parallelize``'s row
    order of ``c_attn``. Tied weights appear once, as ``transformer.wte.weight``.
    """
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        name = name.replace("_orig_mod.", "").replace("module.", "", 1)
        t = p.full_tensor() if isinstance(p, DTensor) else p
        out[name] = t.detach().clone().cpu()
    if tp > 1:
        order = torch.argsort(
            qkv_rows_by_rank(model.config.n_embd, model.config.n_head, tp)
        )
        for name in out:
            if name.endswith("attn.c_attn.weight") or name.endswith("attn.c_attn.bias"):
                out[name] = out[name][order]
    return out


def local_numel(params: Iterable[torch.Tensor]) -> int:
    """Elements this rank actually holds (a DTensor's local shard only)."""
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)


# ----------------------------------------------------------------------------- pipeline


class GPTStage(nn.Module):
    """Blocks ``[start, stop)`` of a GPT; the first stage also embeds the tokens, the
    last one also normalises and projects to logits.

    Modules keep the GPT's names (``transformer.h.3.attn...``), so each stage's state
    dict is a piece of the full one. The last stage's head is its own copy of the
    token embedding (the two stages cannot share one tensor): summing the two copies'
    gradients after every backward pass keeps them equal, as Megatron-LM does.
    """

    def __init__(self, model: nn.Module, start: int, stop: int) -> None:
        super().__init__()
        self.config = model.config
        self.first, self.last = start == 0, stop == model.config.n_layer
        self.tied = model.config.tie_weights  # the head is a copy of the embedding
        tr = model.transformer
        parts: dict[str, nn.Module] = {"h": nn.ModuleDict(
            {str(i): tr.h[i] for i in range(start, stop)})}  # fmt: skip
        if self.first:
            parts |= {k: tr[k] for k in ("wte", "wpe", "drop") if k in tr}
        if self.last:
            parts["ln_f"] = tr.ln_f
            head = nn.Linear(model.config.n_embd, model.config.vocab_size, bias=False)
            head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
            self.lm_head = head
        self.transformer = nn.ModuleDict(parts)
        table = getattr(model, "pos_table", None)  # sinusoidal positions (a buffer)
        if self.first and table is not None:
            self.register_buffer("pos_table", table, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tr = self.transformer
        if self.first:  # as GPT._embed: tokens plus positions (RoPE acts in attention)
            h = tr.wte(x)
            pos = torch.arange(x.size(1), device=x.device)
            if "wpe" in tr:
                h = h + tr.wpe(pos)
            elif hasattr(self, "pos_table"):
                h = h + self.pos_table[pos]
            x = tr.drop(h)
        for block in tr.h.values():
            x = block(x)
        if self.last:
            x = self.lm_head(tr.ln_f(x))
        return x


def split_layers(n_layer: int, n_stages: int) -> list[tuple[int, int]]:
    """Balanced ``(start, stop)`` block ranges, one per pipeline stage."""
    if not 1 <= n_stages <= n_layer:
        raise ValueError(f"cannot split {n_layer} blocks into {n_stages} stages")
    bounds = [round(i * n_layer / n_stages) for i in range(n_stages + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


# ------------------------------------------------------------------------ communication


# bytes each rank SENDS for a collective over a buffer of S bytes on N ranks, with the
# bandwidth-optimal (ring) algorithms: all-reduce = reduce-scatter + all-gather
RING_FACTOR = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "broadcast": lambda n: (n - 1) / n,
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


# ---------------------------------------------------------------------------- memory

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
