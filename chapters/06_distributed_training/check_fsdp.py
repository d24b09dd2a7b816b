"""Worker of ``test_fsdp.py``: ``FSDPByHand`` against one process and PyTorch's FSDP2.

  torchrun --standalone --nproc_per_node 2 check_fsdp.py --out DIR

In float64 on CPU processes (gloo), a tiny GPT (and an odd-sized one whose rows need
padding) trains 3 steps with AdamW over ``parameter_groups``, a global batch of 8 rows
split over the ranks, 2 micro-batches per step (gradient sync on the last only) and
gradient clipping that clips: with ``FSDPByHand``, with FSDP2 (``fully_shard`` on each
block and the root) and, rank 0 alone, in one process. Step 2's collectives are
counted, and those of one more step with a single micro-batch. Rank 0 writes
``DIR/results.json`` and ``DIR/<config>_<run>.safetensors`` (final parameters).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file

from shared import distributed as D
from shared.distributed.fsdp import FSDPByHand
from shared.model import GPT, GPTConfig
from shared.train import parameter_groups

CONFIGS = {
    "even": GPTConfig(vocab_size=64, context_length=16, n_layer=2, n_head=4, n_embd=32),
    "odd": GPTConfig(vocab_size=63, context_length=16, n_layer=2, n_head=3, n_embd=30),
}
STEPS, ACCUM, MICRO = 3, 2, 4  # a global micro-batch of 4 rows, split over ranks
MAX_NORM = 0.05  # below every step's gradient norm: clipping always scales


def batches(cfg: GPTConfig) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """The same global micro-batches on every rank: [step][micro] -> (x, y)."""
    g = torch.Generator().manual_seed(7)
    shape = (STEPS, ACCUM, MICRO, cfg.context_length + 1)
    data = torch.randint(0, cfg.vocab_size, shape, generator=g)
    return [[(d[:, :-1], d[:, 1:]) for d in step] for step in data]


def build(cfg: GPTConfig) -> GPT:
    torch.manual_seed(0)  # every rank (and the reference) starts from the same model
    return GPT(cfg).double()


def loss_of(model, x, y) -> torch.Tensor:
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def train(kind: str, cfg: GPTConfig, env: D.DistEnv) -> dict:
    """3 steps; final parameters, pre-clip norms, step-2 collectives and memory."""
    world, rank = (1, 0) if kind == "single" else (env.world_size, env.rank)
    model = build(cfg)
    fsdp = None
    if kind == "ours":
        fsdp = FSDPByHand(model)
    elif kind == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-2)
    record: dict = {"norms": []}

    def step(micro: list, count: bool) -> None:
        with D.count_collectives(world) as log:
            for k, (x, y) in enumerate(micro):
                rows = slice(rank * MICRO // world, (rank + 1) * MICRO // world)
                last = k == len(micro) - 1
                if kind != "single":  # accumulate locally; reduce-scatter at the last
                    (fsdp or model).set_requires_gradient_sync(last)
                loss = loss_of(model, x[rows], y[rows]) / len(micro)
                if count and k == 0 and fsdp is not None:
                    record["alive_after_forward"] = fsdp.whole_param_bytes()
                loss.backward()
                if count and k == 0 and fsdp is not None:
                    record["alive_after_backward"] = fsdp.whole_param_bytes()
        with D.count_collectives(world) as clip_log:
            if kind == "single":
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
            elif kind == "fsdp2":
                norm = D.clip_gradients(model.parameters(), MAX_NORM)
            else:
                norm = fsdp.clip_grad_norm_(MAX_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if count:
            record["comm"] = log.summary()
            record["sent"] = log.sent()
            record["clip_comm"] = clip_log.summary()
        record["norms"].append(norm.item())

    for s, micro in enumerate(batches(cfg)):
        if fsdp is not None and s == 1:
            record["alive_before_step"] = fsdp.whole_param_bytes()
            fsdp.reset_peak()
        step(micro, count=s == 1)
        if fsdp is not None and s == 1:
            record["peak_param_bytes"] = fsdp.peak_param_bytes
    if kind == "single":
        record["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    elif kind == "fsdp2":
        record["params"] = D.full_state_dict(model)
    else:
        record["params"] = fsdp.full_parameters()
    if kind != "single":  # one more step, one micro-batch (the chapter's table)
        comm = record.pop("comm"), record.pop("sent"), record.pop("clip_comm")
        step(batches(cfg)[0][:1], count=True)
        record["comm_accum1"], record["sent_accum1"] = record["comm"], record["sent"]
        record["comm"], record["sent"], record["clip_comm"] = comm
    if fsdp is not None:
        record |= layout(fsdp, model, cfg)
    return record


def layout(fsdp: FSDPByHand, model: GPT, cfg: GPTConfig) -> dict:
    """What this rank holds, and the units' sizes."""
    fresh = build(cfg)
    groups = parameter_groups(model, 0.1)
    return {
        "names": [n for n, _ in model.named_parameters()],
        "gpt_names": [n for n, _ in fresh.named_parameters()],
        "shapes": [list(p.shape) for p in model.parameters()],
        "gpt_shapes": [list(p.shape) for p in fresh.parameters()],
        "group_sizes": [len(g["params"]) for g in groups],
        "gpt_group_sizes": [len(g["params"]) for g in parameter_groups(fresh, 0.1)],
        "shard_bytes": fsdp.shard_bytes,
        "root_bytes": fsdp.root.whole_bytes,
        "block_bytes": [u.whole_bytes for u in fsdp.blocks],
        "padded_bytes": [u.padded_bytes for u in fsdp.units],
        "model_bytes": sum(p.numel() * 8 for p in fresh.parameters()),
        "tied": model.lm_head.weight is model.transformer.wte.weight,
    }


def start_equal(cfg: GPTConfig) -> dict:
    """Shard a fresh model, gather it back and run it without gradients: the largest
    differences from the unsharded model (0: exact), whole bytes left afterwards."""
    model, ref = build(cfg), build(cfg)
    fsdp = FSDPByHand(model)
    full = fsdp.full_parameters()
    assert sorted(full) == sorted(n for n, _ in ref.named_parameters())
    x = batches(cfg)[0][0][0]
    with torch.no_grad():
        logits = (model(x) - ref(x)).abs().max().item()
    return {
        "start_diff": max((full[n] - p).abs().max().item()
                          for n, p in ref.named_parameters()),
        "no_grad_logits_diff": logits,
        "no_grad_left": fsdp.whole_param_bytes(),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    env = D.init_distributed("cpu", timeout=120)
    runs, per_rank = {}, {}
    for name, cfg in CONFIGS.items():
        runs[f"{name}_ours"] = train("ours", cfg, env)
        runs[f"{name}_fsdp2"] = train("fsdp2", cfg, env)
        runs[f"{name}_ours"] |= start_equal(cfg)
        keys = ("shard_bytes", "shapes", "peak_param_bytes", "comm", "comm_accum1")
        mine = {k: runs[f"{name}_ours"][k] for k in keys}
        per_rank[name] = [None] * env.world_size
        dist.all_gather_object(per_rank[name], mine)
    if env.is_main:
        for name, cfg in CONFIGS.items():
            runs[f"{name}_single"] = train("single", cfg, env)
        args.out.mkdir(parents=True, exist_ok=True)
        summary = {"world_size": env.world_size, "max_norm": MAX_NORM,
                   "per_rank": per_rank}  # fmt: skip
        for name, run in runs.items():
            params = {k: v.contiguous() for k, v in run.pop("params").items()}
            save_file(params, str(args.out / f"{name}.safetensors"))
            summary[name] = run
        (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    D.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
