"""ZeRO stages 1 and 2 by hand: each rank keeps the optimizer state (stage 1) and the
gradients (stage 2) of only its 1/N share of the parameters.

Data parallelism keeps on every rank a full copy of the parameters, the gradients and
AdamW's two moments: 4 copies of the model for plain float32 training. ZeRO
(Rajbhandari et al., 2020) notices that a rank needs only its share of the last two:

- the flattened parameters are cut into buckets; every bucket is padded to a multiple
  of N and rank r owns its r-th chunk. The wrapped optimizer (AdamW, say) is built over
  *pieces*: views of the rank's chunks into the model's own parameters, each in its
  parameter's group (weight decay or not), so the element-wise update is exactly the
  one a single process would make;
- ``step()`` updates the pieces, then one all-gather per bucket hands every rank the
  whole updated model again.

Stage 1 (``stage=1``) lets backward compute whole gradients as usual (accumulation
works unchanged) and reduce-scatters them, bucket by bucket, once per step: each
rank receives the averaged gradient of its chunks. Reduce-scatter + all-gather send
exactly the bytes of DDP's one all-reduce: ZeRO-1 saves memory for free.

Stage 2 (``stage=2``) never keeps the whole gradient. A hook on every parameter copies
its gradient into its bucket as soon as backward has produced it and frees ``.grad``;
a full bucket is reduce-scattered right away (while backward goes on), so a rank
holds its 1/N share plus about two buckets. With gradient accumulation each
micro-batch's share is reduced and added up, as DeepSpeed does: ``accum`` reduce-
scatters per step. Under ``no_sync()`` backward keeps whole gradients in ``.grad``
instead (the memory of stage 1 during accumulation) and the next backward outside it
reduces their sum once: the traffic of stage 1.

Buckets follow the order in which backward produces the gradients, recorded in the
first backward (rank 0's order, shared once), as DDP rebuilds its buckets after its
first iteration. The reverse of the given order would not do: ``parameter_groups``
lists all matrices before the biases, and GPT registers its position table last
though its gradient comes last; the first bucket would wait for the end of backward,
and every bucket behind it. Buckets are launched in order on every rank, so all
ranks issue the same collectives in the same order.

DeepSpeed's ZeRO-1/2 own one contiguous share of the whole flat vector and bucket
the gradients as they come, so a bucket does not split evenly over the ranks and
cannot be reduce-scattered: by default DeepSpeed all-reduces each bucket (1.5 x
the bytes of ZeRO's formula); with ``use_multi_rank_bucket_allreduce: false`` it
reduces each rank's part to its owner (N reduces: the formula's bytes). Here every
bucket is split evenly instead, at the price of a rank's share being scattered over
the buckets. Not here: mixed precision, offloading, a ``state_dict`` to checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from shared.distributed.process_group import all_gather_flat, reduce_scatter_flat


def _nbytes(tensors: Iterable[torch.Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class Bucket:
    """Consecutive parameters (in gradient order) reduced and gathered together."""

    params: list[torch.nn.Parameter]
    offsets: list[int]  # where each parameter starts in the bucket's flat vector
    size: int  # elements, padded to a multiple of the world size
    grad: torch.Tensor | None = None  # this rank's chunk of the averaged gradient
    flat: torch.Tensor | None = None  # stage 2: the bucket being filled by backward
    ready: int = 0  # stage 2: parameters copied into ``flat`` in this backward
    pieces: list[tuple] = field(default_factory=list)  # (param, view, start, end)

    @property
    def full(self) -> bool:
        return self.ready == len(self.params)


class ShardedOptimizer:
    """ZeRO-1 or ZeRO-2 around any element-wise ``torch.optim`` optimizer.

    ``ShardedOptimizer(params, torch.optim.AdamW, stage=2, lr=3e-4)`` takes what the
    wrapped optimizer takes: parameters or parameter groups (``parameter_groups``),
    and its options. Every rank must start from the same parameters and run the same
    backward passes; every parameter must get a gradient in every backward.

    Per step: ``backward()`` (stage 2 reduces during it), optionally
    ``clip_grad_norm_()``, ``step()``, ``zero_grad()``. ``reduce_gradients()`` ends
    the reduction (stage 1: does it) and is called by ``clip_grad_norm_`` and
    ``step`` when needed. Options set on ``param_groups`` (``lr`` each step) are
    handed to the wrapped optimizer at every ``step()``.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict],
        optimizer_cls: type[torch.optim.Optimizer],
        *,
        stage: int = 1,
        bucket_size_mb: float = 25.0,
        process_group: dist.ProcessGroup | None = None,
        **defaults,
    ) -> None:
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2 (3 shards parameters), got {stage}")
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        # the caller's view: each group's options, and its whole parameters
        self.param_groups = [
            defaults | dict(g, params=list(g["params"])) for g in groups
        ]
        self.params = [p for g in self.param_groups for p in g["params"]]
        if not self.params or len(set(self.params)) < len(self.params):
            raise ValueError("ShardedOptimizer needs parameters, each once")
        if any(not p.is_contiguous() for p in self.params):
            raise ValueError("parameters must be contiguous (pieces are views)")
        self.group_of = {p: i for i, g in enumerate(self.param_groups)
                         for p in g["params"]}  # fmt: skip
        self.optimizer_cls, self.defaults, self.stage = optimizer_cls, defaults, stage
        self.bucket_bytes = bucket_size_mb * 2**20  # MiB, as DDP's bucket_cap_mb
        self.group = process_group or dist.group.WORLD
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.buckets: list[Bucket] = []
        self.optim: torch.optim.Optimizer | None = None  # built after 1st backward
        # gradients' arrival order (a dict: `in` on a list would compare tensors)
        self._order: dict[torch.nn.Parameter, None] = {}
        self._place: dict[torch.nn.Parameter, tuple[Bucket, int]] = {}  # offset
        self._next = 0  # stage 2: the next bucket to launch in this backward
        self._pending: tuple | None = None  # the reduce-scatter in flight
        self._sync, self._reduced = True, False
        # every parameter reports its gradient (the handles can .remove() them)
        self.hooks = [
            p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params
        ]

    # ------------------------------------------------------------------ the layout

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        """Called by autograd once ``p.grad`` holds this backward's gradient."""
        if self.optim is None:  # the first backward: learn the order
            self._order[p] = None
            if len(self._order) == len(self.params):
                self._build()
                if self.stage == 2 and self._sync:  # reduce what it holds
                    for q in self._order:
                        self._add(q)
            return
        if self.stage == 2 and self._sync:
            self._add(p)

    @torch.no_grad()
    def _build(self) -> None:
        """Buckets in gradient order (rank 0's), pieces, the wrapped optimizer."""
        index = {p: i for i, p in enumerate(self.params)}
        order = [[index[p] for p in self._order]]
        dist.broadcast_object_list(order, dist.get_global_rank(self.group, 0),
                                   group=self.group)  # fmt: skip
        self._order = {self.params[i]: None for i in order[0]}
        current: list[torch.nn.Parameter] = []
        for p in self._order:
            current.append(p)
            if _nbytes(current) >= self.bucket_bytes:
                self._add_bucket(current)
                current = []
        if current:
            self._add_bucket(current)
        pieces: list[list[torch.Tensor]] = [[] for _ in self.param_groups]
        for bucket in self.buckets:
            for p, piece, _, _ in bucket.pieces:
                pieces[self.group_of[p]].append(piece)
        groups = zip(self.param_groups, pieces, strict=True)
        self.optim = self.optimizer_cls(
            [dict(g, params=ps) for g, ps in groups], **self.defaults
        )

    def _add_bucket(self, params: list[torch.nn.Parameter]) -> None:
        """A bucket over ``params``; this rank's pieces of it: (parameter, view,
        start, end), start:end the piece's place in the rank's chunk."""
        offsets, total = [], 0
        for p in params:
            offsets.append(total)
            total += p.numel()
        size = -(-total // self.world) * self.world  # padded to a multiple of N
        bucket = Bucket(params, offsets, size)
        chunk = size // self.world
        lo, hi = self.rank * chunk, (self.rank + 1) * chunk  # my chunk
        for p, o in zip(params, offsets, strict=True):
            a, b = max(lo, o), min(hi, o + p.numel())
            if a < b:  # the part of p that falls in my chunk
                piece = p.detach().view(-1)[a - o : b - o]
                bucket.pieces.append((p, piece, a - lo, b - lo))
            self._place[p] = (bucket, o)
        self.buckets.append(bucket)

    # ------------------------------------------------------------ the reductions

    @torch.no_grad()
    def _add(self, p: torch.nn.Parameter) -> None:
        """Stage 2: move ``p``'s gradient into its bucket; launch the buckets that
        are full, in order."""
        bucket, o = self._place[p]
        if bucket.flat is None:
            bucket.flat = p.grad.new_zeros(bucket.size)  # zeros: the padding
        bucket.flat[o : o + p.numel()].copy_(p.grad.view(-1))
        p.grad = None  # the whole gradient is not kept: ZeRO-2
        bucket.ready += 1
        while self._next < len(self.buckets) and self.buckets[self._next].full:
            self._launch(self.buckets[self._next])
            self._next += 1
        if self._next == len(self.buckets):  # the whole backward has been reduced
            self._next = 0

    def _launch(self, bucket: Bucket) -> None:
        """Start the reduce-scatter of a full bucket; finish the one before."""
        self._wait()  # one in flight at a time: at most two buckets of memory
        out = bucket.flat.new_empty(bucket.size // self.world)
        work = reduce_scatter_flat(out, bucket.flat, op=dist.ReduceOp.SUM,
                               group=self.group, async_op=True)  # fmt: skip
        self._pending = (work, bucket, out, bucket.flat)
        bucket.flat, bucket.ready = None, 0

    def _wait(self) -> None:
        """Finish the reduce-scatter in flight: add its mean into the bucket's chunk."""
        if self._pending is None:
            return
        work, bucket, out, _ = self._pending
        work.wait()
        out.div_(self.world)  # sum over ranks -> mean (gloo has no AVG)
        bucket.grad = out if bucket.grad is None else bucket.grad.add_(out)
        self._pending = None

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Stage 2: backward inside keeps whole gradients in ``.grad`` (no traffic);
        the next backward outside reduces their sum. Stage 1: nothing to skip."""
        self._sync = False
        try:
            yield
        finally:
            self._sync = True

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Leave every rank holding the averaged gradient of its chunks.

        Stage 1: reduce-scatter the whole gradients (once per step, until
        ``zero_grad``); they stay in ``.grad``. Stage 2: wait for the last bucket.
        """
        if self.optim is None:
            raise RuntimeError(
                f"no gradients yet: {len(self._order)} of {len(self.params)} "
                "parameters got one (each must get one in every backward)"
            )
        if self.stage == 1 and not self._reduced:
            for bucket in self.buckets:
                bucket.flat = self.params[0].new_zeros(bucket.size)
                for p, o in zip(bucket.params, bucket.offsets, strict=True):
                    bucket.flat[o : o + p.numel()].copy_(p.grad.view(-1))
                self._launch(bucket)
        self._wait()
        if any(b.ready for b in self.buckets):
            raise RuntimeError("a bucket is part-full: a parameter got no gradient")
        if self.stage == 2 and any(p.grad is not None for p in self.params):
            raise RuntimeError(
                "whole gradients left by a backward under no_sync(): run the last "
                "micro-batch's backward outside it"
            )
        self._reduced = True
        for bucket in self.buckets:  # the wrapped optimizer reads the pieces' .grad
            for _, piece, a, b in bucket.pieces:
                piece.grad = bucket.grad[a:b]

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale the gradients so their global norm is at most ``max_norm``, as
        ``torch.nn.utils.clip_grad_norm_`` on one process; return the norm.

        Each rank sums the squares of its chunks (padding is zero): one all-reduce
        of that scalar gives the global squared norm.
        """
        self.reduce_gradients()
        square = torch.stack([b.grad.pow(2).sum() for b in self.buckets]).sum()
        dist.all_reduce(square, op=dist.ReduceOp.SUM, group=self.group)
        total = square.sqrt()
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for bucket in self.buckets:
            bucket.grad.mul_(scale)
        return total

    # ------------------------------------------------------------- the update

    @torch.no_grad()
    def step(self) -> None:
        """Update this rank's pieces, then all-gather every bucket into the whole
        parameters of every rank. The gradients stay until ``zero_grad()``."""
        self.reduce_gradients()
        for mine, yours in zip(self.optim.param_groups, self.param_groups, strict=True):
            mine.update({k: v for k, v in yours.items() if k != "params"})
        self.optim.step()
        for bucket in self.buckets:
            chunk = bucket.params[0].new_zeros(bucket.size // self.world)
            for _, piece, a, b in bucket.pieces:
                chunk[a:b] = piece
            full = chunk.new_empty(bucket.size)
            all_gather_flat(full, chunk, group=self.group)
            for p, o in zip(bucket.params, bucket.offsets, strict=True):
                p.view(-1).copy_(full[o : o + p.numel()])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the gradients: the whole ones (``.grad``) and this rank's chunks."""
        self._wait()
        self._reduced = False
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        for bucket in self.buckets:
            if set_to_none:
                bucket.grad = None
                for _, piece, _, _ in bucket.pieces:
                    piece.grad = None
            elif bucket.grad is not None:
                bucket.grad.zero_()

    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds now, measured from the tensors.

        ``params``: the whole parameters (ZeRO-1/2 keep them; the pieces are views);
        ``grads``: whole ``.grad`` tensors, this rank's gradient chunks and buckets
        being filled or reduced; ``optimizer``: the wrapped optimizer's state
        tensors (AdamW: two moments and a step count per piece).
        """
        pending = self._pending[2:] if self._pending is not None else ()
        grads = [p.grad for p in self.params] + list(pending)
        grads += [t for b in self.buckets for t in (b.grad, b.flat)]
        state = self.optim.state.values() if self.optim is not None else []
        return {
            "params": _nbytes(self.params),
            "grads": _nbytes(grads),
            "optimizer": _nbytes(
                v for s in state for v in s.values() if isinstance(v, torch.Tensor)
            ),
        }
