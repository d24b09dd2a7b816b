"""Tensor parallelism (Megatron-LM's split, with DTensor) for the course GPT, and the
whole model back from sharded parameters.

Each rank computes its own heads and hidden units: ``c_attn`` and ``c_fc`` split by
output columns, ``c_proj`` by input rows. ``full_state_dict`` gathers any DTensor
shards (tensor parallel, FSDP2, or both) into the GPT's own parameters.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


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
    if cfg.n_kv_head != cfg.n_head:
        raise NotImplementedError("tensor parallelism here shards multi-head attention")
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
        block.attn.n_kv_head //= tp
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
