"""Data parallelism that overlaps communication with the backward pass: gradients are
all-reduced in buckets while backward still computes the gradients of earlier layers.

``D.allreduce_gradients`` waits for the whole backward pass, then sends every gradient.
Yet backward produces the gradients layer by layer, from the output back to the input:
the last block's gradients are final long before the embedding's. ``BucketedDDP``
groups the gradients into buckets of about ``bucket_size_mb`` MiB, in the order backward
produces them, and starts a bucket's all-reduce (asynchronously) as soon as its last
gradient is ready; backward goes on computing while the bucket travels. This is how
PyTorch's ``DistributedDataParallel`` works (Li et al., "PyTorch Distributed", 2020).

Why buckets and not one all-reduce per tensor: each collective costs a fixed latency
on top of its bytes, and a GPT has many small tensors (biases, norm gains). Why not one
bucket: it can start only when backward has finished, so nothing overlaps. The best
size lies in between (``chapters/06_distributed_training/overlap.py`` measures it)::

    model = BucketedDDP(GPT(config), bucket_size_mb=25)
    with model.no_sync():                       # accumulate locally, no traffic
        model(x1, y1)[1].backward()
    model(x2, y2)[1].backward()                 # buckets all-reduced during backward
    model.finish_gradient_synchronization()     # wait, average, write p.grad
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Bucket:
    """Parameters whose gradients travel together in one all-reduce."""

    names: list[str]
    params: list[nn.Parameter]
    indices: list[int]  # each parameter's place in ``BucketedDDP``'s parameter list
    buffer: torch.Tensor  # flat: the bucket's gradients one after another
    views: list[torch.Tensor]  # each gradient's place in ``buffer``, shaped like it
    ready: set[int] = field(default_factory=set)  # positions whose gradient is in
    work: dist.Work | None = None  # the all-reduce in flight
    timed: torch.futures.Future | None = None  # with a timeline: its "done" recorded

    @property
    def full(self) -> bool:
        return len(self.ready) == len(self.params)


class BucketedDDP(nn.Module):
    """Wrap ``module`` for data parallelism with gradient buckets overlapped with
    backward.

    Built on every rank of ``process_group`` (default: all processes), it copies rank
    0's parameters and buffers to the others so the replicas start equal. Each
    backward pass then all-reduces the gradients bucket by bucket as they become
    ready; ``finish_gradient_synchronization()`` must follow every backward pass run
    outside ``no_sync()``, before clipping and the optimizer step.

    ``bucket_size_mb``: a bucket is closed once it holds at least this many MiB of
    gradients (``None``: one bucket for everything; a tiny size: one per parameter).
    Buckets are filled in reverse ``module.parameters()`` order, the order in which
    backward usually produces gradients. Where that guess is wrong, a bucket waits
    for its latest gradient and every bucket behind it waits too: ``GPT`` registers
    its position embedding last, so it opens the first bucket, yet its gradient is
    one of the last to be ready, and nothing would be sent before backward ends. So,
    as PyTorch's DDP does, with ``rebuild_buckets`` the buckets are rebuilt once, at
    the end of the first ``finish_gradient_synchronization()``, in the order rank 0
    saw the gradients arrive in that step's synchronised backward pass.

    ``timeline=True`` records ``events`` (plain dicts, JSON-ready) with
    ``time.perf_counter()``, one clock for all processes of a machine: forward start
    and end, backward start, each gradient ready (``name``), each bucket's launch and
    completion (``bucket``), and the start and end of the finishing call. Backward
    passes inside ``no_sync()`` record nothing. ``reset_timeline()`` empties it.
    """

    def __init__(
        self,
        module: nn.Module,
        bucket_size_mb: float | None = 25.0,
        process_group: dist.ProcessGroup | None = None,
        timeline: bool = False,
        rebuild_buckets: bool = True,
    ) -> None:
        super().__init__()
        if bucket_size_mb is not None and not bucket_size_mb > 0:
            raise ValueError(f"bucket_size_mb must be > 0 or None: {bucket_size_mb}")
        self.module = module
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.bucket_size_mb = bucket_size_mb
        self.timeline = timeline
        self.events: list[dict] = []
        with torch.no_grad():  # the replicas start equal: everyone takes rank 0's
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.detach(), group=process_group, group_src=0)
        # tied weights once (named_parameters skips repeats), frozen ones not at all
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self._sync = True  # False inside no_sync()
        self._next = 0  # the next bucket to launch: launched in order on every rank
        self._seen: list[int] | None = [] if rebuild_buckets else None
        self._marked_backward = False
        self._build(list(reversed(range(len(self._params)))))
        for i, p in enumerate(self._params):
            p.register_post_accumulate_grad_hook(
                lambda p, i=i: self._gradient_ready(i, p)
            )

    # ------------------------------------------------------------------------ buckets

    def _build(self, order: list[int]) -> None:
        """Fill buckets with the parameters in ``order`` (indices into ``_params``)."""
        limit = float("inf") if self.bucket_size_mb is None else self.bucket_size_mb
        groups: list[list[int]] = []
        size = 0
        for i in order:
            p = self._params[i]
            kind = (p.dtype, p.device)  # one buffer holds one dtype on one device
            last = self._params[groups[-1][-1]] if groups else None
            new_kind = last is None or kind != (last.dtype, last.device)
            if new_kind or size >= limit * 2**20:  # the current bucket is full
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += p.numel() * p.element_size()
        self._buckets = [self._bucket(indices) for indices in groups]
        self._slot = {}  # parameter index -> (bucket, position in it)
        for b, bucket in enumerate(self._buckets):
            for j, i in enumerate(bucket.indices):
                self._slot[i] = (b, j)

    def _bucket(self, indices: list[int]) -> Bucket:
        params = [self._params[i] for i in indices]
        buffer = params[0].new_zeros(sum(p.numel() for p in params))
        views, offset = [], 0
        for p in params:
            views.append(buffer[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        names = [self._names[i] for i in indices]
        return Bucket(names, params, indices, buffer, views)

    @property
    def buckets(self) -> list[list[str]]:
        """The parameter names of each bucket, in launch order."""
        return [list(b.names) for b in self._buckets]

    @property
    def bucket_bytes(self) -> list[int]:
        """The size of each bucket's all-reduce in bytes."""
        return [b.buffer.numel() * b.buffer.element_size() for b in self._buckets]

    # ------------------------------------------------------------- during backward

    def forward(self, *args, **kwargs):
        """Run the wrapped module (with ``timeline``: mark when backward starts)."""
        self._record("forward_start")
        out = self.module(*args, **kwargs)
        self._record("forward_end")
        if self.timeline and self._sync and torch.is_grad_enabled():
            self._marked_backward = False  # the first output gradient marks the start
            for t in _tensors(out):
                if t.requires_grad:
                    t.register_hook(self._backward_started)
        return out

    def _backward_started(self, grad: torch.Tensor) -> None:
        if not self._marked_backward:
            self._marked_backward = True
            self._record("backward_start")

    def _gradient_ready(self, i: int, p: nn.Parameter) -> None:
        """Hook: ``p.grad`` is final for this backward pass; copy it to its bucket."""
        if not self._sync:  # inside no_sync(): the gradient just accumulates in p.grad
            return
        b, j = self._slot[i]
        bucket = self._buckets[b]
        if j in bucket.ready:
            raise RuntimeError(
                f"the gradient of {self._names[i]} was ready twice: call "
                "finish_gradient_synchronization() after every backward pass, or "
                "run the earlier passes of an accumulation inside no_sync()"
            )
        self._record("grad", name=self._names[i])
        if self._seen is not None:
            self._seen.append(i)
        bucket.views[j].copy_(p.grad)
        bucket.ready.add(j)
        # launch every full bucket from the next unlaunched one on, and stop at the
        # first one still waiting: all ranks must start the same collectives in the
        # same order, whatever order their gradients arrive in
        while self._next < len(self._buckets) and self._buckets[self._next].full:
            self._launch(self._next)

    def _launch(self, b: int) -> None:
        bucket = self._buckets[b]
        self._record("launch", bucket=b)
        bucket.work = dist.all_reduce(
            bucket.buffer, group=self.process_group, async_op=True
        )
        if self.timeline:  # runs on the communication thread when the sum is done
            future = bucket.work.get_future()
            bucket.timed = future.then(lambda _, b=b: self._record("done", bucket=b))
        self._next = b + 1

    # -------------------------------------------------------------- after backward

    def finish_gradient_synchronization(self) -> None:
        """Complete the all-reduce of every bucket and put the averages in ``p.grad``.

        Call it after the last backward pass of a step (the one outside
        ``no_sync()``) and before clipping and the optimizer step; every rank must
        call it. Buckets whose parameters did not all get a gradient in that pass are
        launched now: such a parameter contributes what its ``p.grad`` holds
        (gradients accumulated under ``no_sync()``), or zeros if it is ``None``. A
        rank that had no gradient for a parameter receives the average all the same;
        one that no rank used gets zeros (PyTorch's DDP leaves it ``None``).
        """
        self._record("finish_start")
        for bucket in self._buckets[self._next :]:  # the rest, in order
            for j, p in enumerate(bucket.params):
                if j not in bucket.ready:
                    if p.grad is None:
                        bucket.views[j].zero_()
                    else:
                        bucket.views[j].copy_(p.grad)
            self._launch(self._next)
        for bucket in self._buckets:
            bucket.work.wait()
            if bucket.timed is not None:  # its "done" event is in before we go on
                bucket.timed.wait()
                bucket.timed = None
            bucket.buffer.div_(self.world_size)  # the sum of N gradients -> the mean
            for p, view in zip(bucket.params, bucket.views, strict=True):
                if p.grad is None:
                    p.grad = view.clone()
                else:
                    p.grad.copy_(view)
            bucket.ready.clear()
            bucket.work = None
        self._next = 0
        self._record("finish_end")
        if self._seen is not None:
            self._rebuild()

    def _rebuild(self) -> None:
        """Once: rebuild the buckets in the order rank 0's gradients arrived."""
        current = [i for bucket in self._buckets for i in bucket.indices]
        seen = set(self._seen)
        mine = [*self._seen, *(i for i in current if i not in seen)]
        order = torch.tensor(mine, dtype=torch.int64)
        # every rank takes rank 0's order: ranks' orders may differ (a parameter
        # one rank did not use), and different buckets would pair wrong collectives
        dist.broadcast(order, group=self.process_group, group_src=0)
        self._seen = None
        if order.tolist() != current:
            self._build(order.tolist())

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside only accumulate into ``p.grad`` on this rank; the
        next backward pass outside all-reduces the accumulated sums (gradient
        accumulation with one all-reduce per step, as PyTorch DDP's ``no_sync``)."""
        before, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = before

    # ------------------------------------------------------------------- timeline

    def _record(self, kind: str, **info) -> None:
        if self.timeline and self._sync:
            self.events.append({"kind": kind, "t": time.perf_counter(), **info})

    def reset_timeline(self) -> None:
        """Forget the recorded events (call it at the start of the step to draw)."""
        self.events = []


def _tensors(out) -> Iterator[torch.Tensor]:
    """The tensors in a module's output (a tensor, or tuples/lists/dicts of them)."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (list, tuple)):
        for item in out:
            yield from _tensors(item)
    elif isinstance(out, dict):
        for item in out.values():
            yield from _tensors(item)
