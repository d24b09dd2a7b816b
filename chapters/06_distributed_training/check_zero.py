"""Worker of test_zero.py: ZeRO-1 and ZeRO-2 by hand (``shared.distributed.zero``)
against one process and PyTorch's ZeroRedundancyOptimizer, on N gloo processes.

  torchrun --standalone --nproc_per_node 2 check_zero.py --out OUT

Trains a tiny float64 GPT for 3 steps (AdamW with decay / no-decay groups, an lr
that changes every step, 2 micro-batches per step, clipping that clips) with each
variant; counts the collectives of the last step and measures the bytes each rank
holds. Rank 0 writes ``OUT/record.json`` and one ``OUT/<variant>.safetensors`` of
final parameters per variant.
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.distributed.optim import ZeroRedundancyOptimizer

from shared import distributed as D
from shared.distributed.zero import ShardedOptimizer
from shared.model import GPT, GPTConfig
from shared.train import parameter_groups

CONFIG = GPTConfig(vocab_size=64, context_length=16, n_layer=2, n_head=4, n_embd=32)
STEPS, ACCUM, MICRO = 3, 2, 4  # MICRO: windows per micro-batch, all ranks together
LRS = [3e-3, 1e-2, 5e-3]  # a different lr every step
CLIP = 0.5  # below the gradient norms (0.7-1.2): it really clips
SMALL_BUCKET_MB = 0.02  # ZeRO-2: ~2,600 float64 elements, about ten buckets


def batches() -> torch.Tensor:
    """(steps, accum, MICRO, context + 1) random token windows, the same everywhere."""
    g = torch.Generator().manual_seed(0)
    shape = (STEPS, ACCUM, MICRO, CONFIG.context_length + 1)
    return torch.randint(0, CONFIG.vocab_size, shape, generator=g)


def build_model() -> GPT:
    torch.manual_seed(1337)
    return GPT(CONFIG).double()


def train(variant: str, group, world: int, rank: int) -> tuple[GPT, dict]:
    """Train with one variant; its record: norms, the last step's collectives and
    the bytes held (after the reduction, and the gradients' peak in backward)."""
    model = build_model()
    groups = parameter_groups(model, 0.1)
    if variant == "single":
        opt = torch.optim.AdamW(groups, lr=LRS[0])
    elif variant == "torch_zero":
        opt = ZeroRedundancyOptimizer(groups, torch.optim.AdamW, process_group=group,
                                      lr=LRS[0])  # fmt: skip
    else:
        stage = 1 if variant == "zero1" else 2
        bucket = 25.0 if stage == 1 else SMALL_BUCKET_MB
        opt = ShardedOptimizer(groups, torch.optim.AdamW, stage=stage, lr=LRS[0],
                               bucket_size_mb=bucket, process_group=group)  # fmt: skip
    sharded = isinstance(opt, ShardedOptimizer)
    peak = [0]
    if sharded:  # runs after the optimizer's own hook (hooks run in order)

        def probe(p):
            peak[0] = max(peak[0], opt.state_bytes()["grads"])

        for p in model.parameters():
            p.register_post_accumulate_grad_hook(probe)
    data = batches()
    rows = slice(rank * MICRO // world, (rank + 1) * MICRO // world)
    record = {"norms": []}
    for step in range(STEPS):
        for g in opt.param_groups:
            g["lr"] = LRS[step]
        last = step == STEPS - 1
        peak[0] = 0
        with D.count_collectives(world) if last else nullcontext() as log:
            for k in range(ACCUM):
                x, y = data[step, k, rows, :-1], data[step, k, rows, 1:]
                logits = model(x)
                loss = F.cross_entropy(logits.flatten(0, 1), y.flatten()) / ACCUM
                skip = variant == "zero2_no_sync" and k < ACCUM - 1
                with opt.no_sync() if skip else nullcontext():
                    loss.backward()
            if variant == "torch_zero":
                D.allreduce_gradients(model, world)  # ZeroRedundancyOptimizer: by hand
            if sharded and last:
                opt.reduce_gradients()
                record["held"] = opt.state_bytes()
                record["grads_peak"] = peak[0]
            if sharded:
                norm = opt.clip_grad_norm_(CLIP)
            else:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
        opt.zero_grad(set_to_none=True)
        record["norms"].append(norm.item())
    record["calls"] = log.calls  # the last step's
    if sharded:
        record["pieces"] = sum(len(g["params"]) for g in opt.optim.param_groups)
        record["buckets"] = [b.size for b in opt.buckets]
        record["held_after_zero_grad"] = opt.state_bytes()
    if variant == "torch_zero":
        state = [v for s in opt.optim.state.values() for v in s.values()]
        record["held"] = {"optimizer": sum(v.numel() * v.element_size() for v in state)}
    return model, record


def parameters(model: GPT) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def replicas_differ(model: GPT) -> float:
    """Largest difference between this rank's parameters and rank 0's (collective)."""
    flat = torch.cat([p.detach().view(-1) for p in model.parameters()])
    theirs = flat.clone()
    dist.broadcast(theirs, 0)
    diff = (flat - theirs).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


def errors(group) -> dict[str, str]:
    """The messages a misuse gets (on a process group of one)."""
    out = {}
    model = build_model()
    opt = ShardedOptimizer(model.parameters(), torch.optim.AdamW, stage=2,
                           process_group=group)  # fmt: skip
    for name, call in [("step_first", opt.step), ("stage3", None)]:
        try:
            if call is None:
                ShardedOptimizer(model.parameters(), torch.optim.AdamW, stage=3)
            else:
                call()
        except (RuntimeError, ValueError) as e:
            out[name] = str(e)
    x = batches()[0, 0, :, :-1]
    with opt.no_sync():
        model(x).sum().backward()
    try:
        opt.step()
    except RuntimeError as e:
        out["no_sync_left"] = str(e)
    return out


def count_reduces(world: int, rank: int) -> dict:
    """One ``dist.reduce`` to every rank (DeepSpeed's ZeRO without its bucket
    all-reduce), as the collective counter sees them."""
    with D.count_collectives(world) as log:
        for dst in range(world):
            dist.reduce(torch.ones(100, dtype=torch.float64) * rank, dst)
    return {"calls": log.calls, "sent": log.sent()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    env = D.init_distributed("cpu")
    world, rank = env.world_size, env.rank
    solo, _ = dist.new_subgroups(1)  # every rank alone: ZeRO on one process
    out: dict = {"world_size": world, "reduce": count_reduces(world, rank)}
    finals = {}
    if rank == 0:
        finals["single"], out["single"] = train("single", None, 1, 0)
        if world == 2:  # N = 1, for the memory table
            for v in ("zero1", "zero2"):
                out[f"{v}_one_process"] = train(v, solo, 1, 0)[1]
            out["errors"] = errors(solo)
    for v in ("zero1", "zero2", "zero2_no_sync", "torch_zero"):
        finals[v], rec = train(v, None, world, rank)
        rec["replicas_differ"] = replicas_differ(finals[v])
        per_rank = [None] * world
        dist.all_gather_object(per_rank, rec)
        out[v] = per_rank
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        for v, model in finals.items():
            save_file(parameters(model), str(args.out / f"{v}.safetensors"))
        (args.out / "record.json").write_text(json.dumps(out, indent=1))
    D.shutdown()


if __name__ == "__main__":
    main()
