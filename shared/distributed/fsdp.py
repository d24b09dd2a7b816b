"""Fully sharded data parallelism (FSDP, ZeRO-3) by hand, unit by unit like PyTorch's
FSDP2 with ``fully_shard`` on every transformer block and on the root.

    fsdp = FSDPByHand(model)          # shards ``model`` (a GPT) in place
    opt = torch.optim.AdamW(parameter_groups(model, 0.1))   # steps the shards
    loss = loss_fn(model(x), y)       # or fsdp(x)
    loss.backward()                   # gradients reduce-scattered into the shards
    fsdp.clip_grad_norm_(1.0); opt.step()

At rest each of the N ranks holds 1/N of every parameter: rows ``[r c, (r+1) c)`` of
dim 0, ``c = ceil(rows / N)`` (the last ranks fewer, or none: FSDP2's ``Shard(0)``,
padded to ``N c`` rows only inside the communication buffers). The shard is an
``nn.Parameter`` under the parameter's own name with the same number of dims, so
``named_parameters()``, ``shared.train.parameter_groups`` (decay for >= 2-D) and a
plain AdamW work unchanged; the tied embedding/head matrix is one shard in both
places. The model is cut into units: each block, and the root (the rest: token and
position embeddings, final norm, tied head). A unit's whole parameters exist only
while they are needed:

    forward    root     all-gather; kept until the end of the backward (as FSDP2's
                        root, which does not reshard after forward)
               block i  all-gather, run, free
    backward   block i  all-gather again just before autograd needs the weights,
                        compute, reduce-scatter the gradients (mean over ranks), free
               root     reduce-scatter, free (its gradients are complete last)

So a rank's parameters peak at its shards + the root + one block, and each
micro-batch sends one all-gather per unit forward, one per block backward and one
reduce-scatter per unit: call for call what FSDP2 sends (gradient clipping aside:
one all-reduce here, one per parameter for FSDP2's DTensor norms).

Three pieces of PyTorch make it work:

- ``module.__dict__``: while a unit runs, its modules' ``__dict__`` holds the whole
  tensor under the parameter's name. Python finds instance attributes before
  ``nn.Module.__getattr__`` looks in ``_parameters`` (where the shard stays), so
  ``nn.Linear.forward`` multiplies by the whole weight without knowing about shards.
- ``_Unshard``, an autograd Function: shards in, whole parameters out (the
  all-gather); backward: gradients of the whole parameters in, the shards' gradients
  out (the reduce-scatter). Autograd calls it once all of a unit's gradients are in.
- ``saved_tensors_hooks``: autograd keeps the tensors a backward needs (a linear layer
  keeps its weight). The pack hook turns any saved tensor that shares storage with a
  block's whole parameter into a note (unit, index, view); the unpack hook, called by
  backward, gathers the unit again if it is not gathered and rebuilds the view. So
  nothing holds a freed block's weights, and backward re-gathers each block exactly
  when its first weight is needed.

One forward, then its backward, per micro-batch (as in training); activation
checkpointing of the blocks is not supported. ``peak_param_bytes`` is measured on the
storages themselves (weak references): a forgotten reference would show.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.multiprocessing.reductions import StorageWeakRef

from shared.distributed.process_group import all_gather_flat, reduce_scatter_flat

Slot = tuple[nn.Module, str]  # where a parameter is registered: module, attribute


@dataclass(frozen=True)
class ShardLayout:
    """One parameter's split: its whole shape, ``chunk`` rows per rank (the last ranks
    fewer or none), and where its rows sit in the unit's flat buffer of one rank
    (``offset``, ``chunk * inner`` elements, padding included)."""

    shape: torch.Size
    world: int
    offset: int

    @property
    def chunk(self) -> int:
        return math.ceil(self.shape[0] / self.world)

    @property
    def inner(self) -> int:
        """Elements per row (dim 0)."""
        return math.prod(self.shape[1:])

    @property
    def numel(self) -> int:
        """Elements in one rank's flat buffer, padding included."""
        return self.chunk * self.inner

    def rows(self, rank: int) -> tuple[int, int]:
        """Rows ``[lo, hi)`` of the whole parameter that ``rank`` holds."""
        lo = min(rank * self.chunk, self.shape[0])
        return lo, min(lo + self.chunk, self.shape[0])


class Unit:
    """Parameters gathered and reduced together (one block, or the root), with one
    all-gather and one reduce-scatter over a flat buffer of all of them."""

    def __init__(
        self,
        fsdp: FSDPByHand,
        module: nn.Module,
        params: list[tuple[nn.Parameter, list[Slot]]],
        reshard_after_forward: bool,
    ) -> None:
        self.fsdp, self.module = fsdp, module
        self.reshard_after_forward = reshard_after_forward
        self.slots = [slots for _, slots in params]
        self.layouts: list[ShardLayout] = []
        self.shards: list[nn.Parameter] = []
        offset = 0
        for p, slots in params:
            if p.dim() == 0 or p.dtype != params[0][0].dtype:
                raise ValueError("a unit shards >= 1-D parameters of one dtype")
            layout = ShardLayout(p.shape, fsdp.world, offset)
            offset += layout.numel
            lo, hi = layout.rows(fsdp.rank)
            shard = nn.Parameter(p.detach()[lo:hi].clone(), p.requires_grad)
            for module, name in slots:  # the original (whole) tensor is dropped
                module._parameters[name] = shard
            self.layouts.append(layout)
            self.shards.append(shard)
        self.flat_numel = offset  # per rank
        self.whole: list[torch.Tensor] | None = None  # while gathered
        self.grad_sum: list[torch.Tensor] | None = None  # accumulated without sync
        self.storages: list[int] = []  # data pointers of the whole parameters

    @property
    def whole_bytes(self) -> int:
        """Bytes of the unit's whole parameters (no padding)."""
        size = self.shards[0].element_size()
        return sum(math.prod(lay.shape) for lay in self.layouts) * size

    @property
    def padded_bytes(self) -> int:
        """Bytes one all-gather receives (or one reduce-scatter sends): N flat
        buffers, each parameter padded to ``N * chunk`` rows."""
        return self.fsdp.world * self.flat_numel * self.shards[0].element_size()

    def _buffer(self, *shape: int) -> torch.Tensor:
        s = self.shards[0]
        return torch.zeros(shape, dtype=s.dtype, device=s.device)

    def all_gather(self) -> list[torch.Tensor]:
        """ONE all-gather: this rank's shards in, the whole parameters out."""
        world = self.fsdp.world
        send = self._buffer(self.flat_numel)
        for shard, lay in zip(self.shards, self.layouts, strict=True):
            send[lay.offset : lay.offset + shard.numel()] = shard.detach().flatten()
        recv = self._buffer(world * self.flat_numel)
        all_gather_flat(recv, send, group=self.fsdp.group)
        recv = recv.view(world, self.flat_numel)  # row k: rank k's send buffer
        whole = []
        for lay in self.layouts:
            w = torch.empty(lay.shape, dtype=recv.dtype, device=recv.device)
            for k in range(world):  # copy out rank k's rows, leaving its padding
                lo, hi = lay.rows(k)
                n = (hi - lo) * lay.inner
                w[lo:hi].view(-1).copy_(recv[k, lay.offset : lay.offset + n])
            whole.append(w)
        return whole

    def reduce_scatter(self, grads: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        """ONE reduce-scatter: every rank's whole gradients in; out, the mean over
        ranks of this rank's rows (the gradient of the global batch's mean loss)."""
        world = self.fsdp.world
        send = self._buffer(world, self.flat_numel)  # row k: the rows rank k keeps
        for g, lay in zip(grads, self.layouts, strict=True):
            flat = g.reshape(-1)
            for k in range(world):
                lo, hi = lay.rows(k)
                n = (hi - lo) * lay.inner
                send[k, lay.offset : lay.offset + n] = flat[lo * lay.inner :][:n]
        recv = self._buffer(self.flat_numel)
        reduce_scatter_flat(recv, send.view(-1), group=self.fsdp.group)  # sum
        recv /= world  # gloo has no AVG: sum, then divide
        return [
            recv[lay.offset : lay.offset + s.numel()].view_as(s).clone()
            for s, lay in zip(self.shards, self.layouts, strict=True)
        ]

    def install(self, whole: list[torch.Tensor]) -> None:
        """Make ``whole`` the unit's parameters: each module's ``__dict__`` entry hides
        the shard registered in its ``_parameters``."""
        self.whole = whole
        for w, slots in zip(whole, self.slots, strict=True):
            for module, name in slots:
                module.__dict__[name] = w
        self.fsdp._track(self)

    def free(self) -> None:
        """Drop every reference this unit holds to its whole parameters."""
        for slots in self.slots:
            for module, name in slots:
                module.__dict__.pop(name, None)  # ``module.name`` is the shard again
        self.fsdp._untrack(self)
        self.whole = None

    def post_backward(self, grads: tuple[torch.Tensor, ...]) -> list:
        """The unit's whole gradients are complete: free the whole parameters; with
        gradient sync, reduce-scatter (plus what earlier micro-batches left), else
        keep the sum for later and give the shards no gradient yet."""
        self.free()
        if self.grad_sum is not None:
            grads = tuple(a + g for a, g in zip(self.grad_sum, grads, strict=True))
        if not self.fsdp.requires_sync:
            self.grad_sum = list(grads)
            return [None] * len(grads)
        self.grad_sum = None
        return self.reduce_scatter(grads)


class _Unshard(torch.autograd.Function):
    """Shards in, whole parameters out (all-gather); backward: the whole parameters'
    gradients in, the shards' gradients out (reduce-scatter)."""

    @staticmethod
    def forward(ctx, unit: Unit, *shards: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.unit = unit
        return tuple(unit.all_gather())

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple:
        return (None, *ctx.unit.post_backward(grads))


@dataclass(frozen=True)
class _Note:
    """What autograd keeps instead of a view of a block's whole parameter."""

    unit: Unit
    index: int
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


def _unit_params(
    module: nn.Module, skip: set[int]
) -> list[tuple[nn.Parameter, list[Slot]]]:
    """``module``'s parameters (not those in ``skip``), each with every place it is
    registered: a tied weight is one parameter with two slots."""
    found: dict[int, tuple[nn.Parameter, list[Slot]]] = {}
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None and id(p) not in skip:
                found.setdefault(id(p), (p, []))[1].append((sub, name))
    return list(found.values())


class FSDPByHand:
    """Shard ``model`` in place over ``process_group`` (default: all ranks): each of
    ``blocks`` (default ``model.transformer.h``) one unit, the rest the root unit.

    Every rank must build the same model first (same seed). Call the model (or this
    object) as usual; ``set_requires_gradient_sync``, ``clip_grad_norm_``,
    ``full_parameters`` and the memory counters are here.
    """

    def __init__(
        self,
        model: nn.Module,
        process_group=None,
        blocks: Iterable[nn.Module] | None = None,
    ) -> None:
        self.model, self.group = model, process_group
        self.world = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        blocks = list(model.transformer.h if blocks is None else blocks)
        in_blocks = {id(p) for b in blocks for p in b.parameters()}
        self.root = Unit(self, model, _unit_params(model, in_blocks), False)
        self.blocks = [Unit(self, b, _unit_params(b, set()), True) for b in blocks]
        self.units = [self.root, *self.blocks]
        self.requires_sync = True
        self.peak_param_bytes = 0  # most whole-parameter bytes alive at once
        self._alive: list[tuple[StorageWeakRef, int]] = []
        self._notes: dict[int, tuple[Unit, int]] = {}  # storage -> block, index
        self._hooks: saved_tensors_hooks | None = None
        for unit in self.blocks:
            unit.module.register_forward_pre_hook(lambda m, a, u=unit: self._before(u))
            unit.module.register_forward_hook(
                lambda m, a, out, u=unit: self._after(u), always_call=True
            )
        model.register_forward_pre_hook(self._root_before)
        model.register_forward_hook(self._root_after, always_call=True)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # ------------------------------------------------------------ forward hooks

    def _root_before(self, module, args) -> None:
        self._hooks = saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()  # active while the blocks run (left in _root_after)
        self._before(self.root)

    def _root_after(self, module, args, out) -> None:
        self._after(self.root)
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None

    def _before(self, unit: Unit) -> None:
        if unit.whole is not None:  # from a forward whose backward never ran
            unit.free()
        if torch.is_grad_enabled() and any(s.requires_grad for s in unit.shards):
            unit.install(list(_Unshard.apply(unit, *unit.shards)))
        else:  # no backward will come: plain tensors
            unit.install(unit.all_gather())

    def _after(self, unit: Unit) -> None:
        if unit.reshard_after_forward or not torch.is_grad_enabled():
            unit.free()

    # ------------------------------------------------------- saved tensors hooks

    def _pack(self, t: torch.Tensor):
        try:
            found = self._notes.get(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # a tensor without storage
            return t
        if found is None:  # an activation, or a root parameter: kept as it is
            return t
        unit, index = found
        return _Note(unit, index, t.size(), t.stride(), t.storage_offset())

    @staticmethod
    def _unpack(saved):
        if not isinstance(saved, _Note):
            return saved
        unit = saved.unit
        if unit.whole is None:  # the backward re-gather: first use of this block
            unit.install(unit.all_gather())
        return unit.whole[saved.index].as_strided(saved.size, saved.stride,
                                                  saved.offset)  # fmt: skip

    # --------------------------------------------------------- memory accounting

    def _track(self, unit: Unit) -> None:
        unit.storages = [w.untyped_storage().data_ptr() for w in unit.whole]
        for i, w in enumerate(unit.whole):
            storage = w.untyped_storage()
            self._alive.append((StorageWeakRef(storage), storage.nbytes()))
            if unit.reshard_after_forward:  # the root's whole parameters stay put
                self._notes[unit.storages[i]] = (unit, i)
        self.peak_param_bytes = max(self.peak_param_bytes, self.whole_param_bytes())

    def _untrack(self, unit: Unit) -> None:
        for ptr in unit.storages:
            self._notes.pop(ptr, None)
        unit.storages = []

    def whole_param_bytes(self) -> int:
        """Bytes of whole (gathered) parameters alive on this rank now, counted on
        their storages: one still referenced anywhere counts."""
        self._alive = [(ref, n) for ref, n in self._alive if not ref.expired()]
        return sum(n for _, n in self._alive)

    def reset_peak(self) -> None:
        """Start measuring ``peak_param_bytes`` again from now."""
        self.peak_param_bytes = self.whole_param_bytes()

    @property
    def shard_bytes(self) -> int:
        """Bytes of this rank's shards (what it holds at rest)."""
        return sum(s.numel() * s.element_size() for u in self.units for s in u.shards)

    # ------------------------------------------------------------------ training

    def set_requires_gradient_sync(self, requires_sync: bool) -> None:
        """As FSDP2's: with ``False``, backward adds the whole gradients up locally
        (no communication, shards get no gradient: whole-size gradients of every
        unit are held meanwhile); the next backward with ``True`` reduce-scatters
        the sum once."""
        self.requires_sync = requires_sync

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale the gradients so their global norm is at most ``max_norm`` (as
        ``torch.nn.utils.clip_grad_norm_``); the norm, with ONE all-reduce.

        Each element lives on exactly one rank (the tied matrix once), so the
        global squared norm is the sum over ranks of each rank's own sum of squares.
        """
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        acc = torch.promote_types(self.root.shards[0].dtype, torch.float32)
        sq = torch.zeros((), dtype=acc, device=self.root.shards[0].device)
        for g in grads:
            sq += g.to(acc).pow(2).sum()
        dist.all_reduce(sq, group=self.group)
        total = sq.sqrt()
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(scale.to(g.dtype))
        return total

    @torch.no_grad()
    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter whole, on CPU, under the model's own names (tied weights
        once), on every rank. Collective: every rank must call it."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        out = {}
        for unit in self.units:
            for shard, w in zip(unit.shards, unit.all_gather(), strict=True):
                out[names[id(shard)]] = w.cpu()
        return out
