"""Worker of ``test_bucketed.py``: ``BucketedDDP`` against one process and torch DDP.

  torchrun --standalone --nproc_per_node 2 check_bucketed.py --out DIR

In float64 on CPU processes (gloo), a tiny GPT trains 3 steps with AdamW, a global
batch of 8 rows split over the ranks, 2 micro-batches per step (the first under
``no_sync``) and gradient clipping: with ``BucketedDDP`` at several bucket sizes, with
PyTorch's ``DistributedDataParallel``, and (rank 0 alone) in one process on the whole
batch. A second model uses one parameter on rank 0 only and one on no rank. Rank 0
writes ``DIR/results.json`` (gradient norms, collectives, buckets, one timeline) and
``DIR/<run>.safetensors`` (final parameters).
"""

from __future__ import annotations

import argparse
import json
import os
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from shared import distributed as D
from shared.distributed.bucketed import BucketedDDP
from shared.model import GPT, GPTConfig
from shared.train import parameter_groups

CONFIG = GPTConfig(vocab_size=64, context_length=16, n_layer=2, n_head=4, n_embd=32)
STEPS, ACCUM, MICRO = 3, 2, 4  # a global micro-batch of 4 rows: 2 per rank
MID = 0.05  # MiB: 5 buckets of the 0.21 MiB float64 model
SIZES = {"none": None, "tiny": 1e-9, "mid": MID}


class SideHead(nn.Module):
    """A GPT plus a logit bias used only when asked (rank 0) and a gain never used."""

    def __init__(self) -> None:
        super().__init__()
        self.gpt = GPT(CONFIG)
        self.side = nn.Parameter(torch.zeros(CONFIG.vocab_size))
        self.never = nn.Parameter(torch.ones(3))

    def forward(self, idx, targets, use_side: bool):
        logits = self.gpt(idx)
        if use_side:
            logits = logits + self.side
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def batches() -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """The same global micro-batches on every rank: [step][micro] -> (x, y)."""
    g = torch.Generator().manual_seed(7)
    shape = (STEPS, ACCUM, MICRO, CONFIG.context_length + 1)
    data = torch.randint(0, CONFIG.vocab_size, shape, generator=g)
    return [[(d[:, :-1], d[:, 1:]) for d in step] for step in data]


def build(side: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return (SideHead() if side else GPT(CONFIG)).double()


def shares(x, y, side: bool, rank: int | None, world: int) -> list:
    """The (x, y, use_side) pieces whose mean loss this process backpropagates: its
    rank's rows; in one process (``rank=None``) the whole micro-batch, in one piece
    (or one per rank for the side model, whose ranks differ)."""
    if rank is None and not side:
        return [(x, y, False)]
    rows = MICRO // world
    ranks = range(world) if rank is None else [rank]
    return [(x[r * rows : (r + 1) * rows], y[r * rows : (r + 1) * rows], r == 0)
            for r in ranks]  # fmt: skip


def train(kind: str, env: D.DistEnv, size=None, side=False, **kw) -> dict:
    """3 steps of ``kind`` (single, ddp, bucketed): final parameters, pre-clip
    gradient norms; for ``bucketed`` the last step's collectives, buckets, events."""
    # every rank builds a different model: the wrappers must broadcast rank 0's
    model = inner = build(side, seed=0 if kind == "single" else env.rank)
    if kind == "bucketed":
        model = BucketedDDP(inner, bucket_size_mb=size, **kw)
    elif kind == "ddp":
        model = DDP(inner, find_unused_parameters=side)
    opt = torch.optim.AdamW(parameter_groups(inner, 0.1), lr=1e-2)
    rank = None if kind == "single" else env.rank
    norms, record = [], {}
    for step, micro in enumerate(batches()):
        for k, (x, y) in enumerate(micro):
            last = k == ACCUM - 1
            sync = model.no_sync() if kind != "single" and not last else nullcontext()
            counting = kind == "bucketed" and step == STEPS - 1
            if counting and last:
                model.reset_timeline()  # the timeline of the last step's sync pass
            count = D.count_collectives(env.world_size) if counting else nullcontext()
            with sync, count as log:
                pieces = shares(x, y, side, rank, env.world_size)
                losses = [model(*p)[1] if side else model(*p[:2])[1] for p in pieces]
                (sum(losses) / len(losses) / ACCUM).backward()
                if last and kind == "bucketed":
                    model.finish_gradient_synchronization()
            if counting:
                record["calls" if last else "no_sync_calls"] = log.calls
        norm = torch.nn.utils.clip_grad_norm_(list(inner.parameters()), 0.5)
        norms.append(norm.item())
        if side:
            never = inner.never.grad
            record["never_grad"] = None if never is None else never.tolist()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if kind == "bucketed":
        record |= {"buckets": model.buckets, "bucket_bytes": model.bucket_bytes,
                   "events": model.events}  # fmt: skip
    params = {n: p.detach().clone() for n, p in inner.named_parameters()}
    return {"params": params, "norms": norms, **record}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    env = D.init_distributed("cpu", timeout=60)  # a mismatched collective: fail soon
    runs = {"ddp": train("ddp", env), "side_ddp": train("ddp", env, side=True)}
    for name, size in SIZES.items():
        runs[name] = train("bucketed", env, size)
    runs["mid_no_rebuild"] = train("bucketed", env, MID, rebuild_buckets=False)
    runs["timeline"] = train("bucketed", env, MID, timeline=True)
    runs["side_tiny"] = train("bucketed", env, 1e-9, side=True)
    runs["side_mid"] = train("bucketed", env, MID, side=True)
    gathered = {}
    for name, key in [("timeline", "events"), ("side_mid", "never_grad")]:
        gathered[name] = [None] * env.world_size
        dist.all_gather_object(gathered[name], runs[name][key])
    if env.is_main:
        runs["single"] = train("single", env)
        runs["side_single"] = train("single", env, side=True)
        args.out.mkdir(parents=True, exist_ok=True)
        for name, run in runs.items():
            save_file(run.pop("params"), str(args.out / f"{name}.safetensors"))
        runs["timeline"]["events_per_rank"] = gathered["timeline"]
        runs["side_mid"]["never_grad_per_rank"] = gathered["side_mid"]
        (args.out / "results.json").write_text(json.dumps(runs, indent=1))
    D.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
