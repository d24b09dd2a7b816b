"""Train a small course GPT with any parallel strategy; compare each with one process.

  python train_distributed.py --strategy single --steps 20 --out runs/single
  torchrun --standalone --nproc_per_node 2 train_distributed.py --strategy ddp \
      --steps 20 --out runs/ddp

Strategies: ``single`` (one process: the reference), ``manual`` (data parallel with a
hand-written all-reduce), ``ddp``, ``fsdp2``, ``tp`` (tensor parallel), ``fsdp2_tp``
(2-D: FSDP2 across ``--tp``-sized groups), ``pp`` (pipeline, GPipe or 1F1B), and
``zero1``/``zero2``/``zero3`` (DeepSpeed). Every strategy sees the same model (same
seed), the same data and the same global batch of ``--batch`` windows per step, split
into ``--accum`` micro-batches; data-parallel ranks each take their share of every
micro-batch. Writes ``OUT/losses.json`` (losses, timings, communication, memory per
rank) and ``OUT/final.safetensors`` (the whole model under ``shared.model.GPT``'s
parameter names, tied weights once).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file

from shared import distributed as D
from shared.model import GPT, GPTConfig
from shared.pretrained import LAPTOP_MODEL_DIR, shakespeare_splits
from shared.tokenizer import BPETokenizer
from shared.train import TrainConfig, lr_at, parameter_groups

STRATEGIES = ("single", "manual", "ddp", "fsdp2", "tp", "fsdp2_tp", "pp")
STRATEGIES += ("zero1", "zero2", "zero3")
# built by hand in shared/distributed/: bucketed DDP, ZeRO-1/2, FSDP, ring attention
STRATEGIES += ("bucketed", "zero1_hand", "zero2_hand", "fsdp_hand", "ring")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def strategies(text: str) -> str:
    unknown = [s for s in text.split(",") if s not in STRATEGIES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}"
        )
    return text


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--strategy",
        type=strategies,
        default="single",
        help="one of " + ", ".join(STRATEGIES) + "; or several, comma-"
        "separated, run one after the other (results in OUT/<strategy>)",
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch", type=int, default=8, help="global batch (windows/step)")
    p.add_argument("--accum", type=int, default=2, help="micro-batches per step")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW's epsilon")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel group (fsdp2_tp)")
    p.add_argument("--schedule", choices=("gpipe", "1f1b"), default="gpipe")
    p.add_argument("--bucket-mb", type=float, default=25.0,
                   help="bucketed, zero*_hand: gradient bucket in MiB")  # fmt: skip
    p.add_argument("--mixed-precision", action="store_true",
                   help="fsdp2: bf16 parameters and gradient reduction")  # fmt: skip
    p.add_argument("--count-comm", action="store_true",
                   help="record every collective of one step (step 2)")  # fmt: skip
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="end after this many steps (the schedule still spans --steps)",
    )
    p.add_argument("--save-dcp", type=Path, help="save a sharded checkpoint here")
    p.add_argument("--resume-dcp", type=Path, help="start from a sharded checkpoint")
    return p.parse_args(argv)


def model_config(args) -> GPTConfig:
    return GPTConfig(
        vocab_size=1024, context_length=args.context, n_layer=args.n_layer,
        n_head=args.n_head, n_embd=args.n_embd, dropout=0.0,
    )  # fmt: skip


def train_config(args) -> TrainConfig:
    return TrainConfig(
        max_steps=args.steps, batch_size=args.batch // args.accum,
        grad_accum_steps=args.accum, lr=args.lr, min_lr=args.lr / 10,
        warmup_steps=args.warmup, weight_decay=0.1, grad_clip=1.0, seed=args.seed,
    )  # fmt: skip


def train_ids():
    tokenizer = BPETokenizer.load(LAPTOP_MODEL_DIR / "tokenizer.json")
    return shakespeare_splits(tokenizer)["train_ids"]


def build_model(args) -> GPT:
    torch.manual_seed(args.seed)  # every rank builds the very same initial model
    return GPT(model_config(args)).to(DTYPES[args.dtype])


# --------------------------------------------------------------------------- strategies


class Setup:
    """What a strategy decides: the module to run, the optimizer, the data-parallel
    group this rank belongs to, and how one micro-batch's backward is done."""

    def __init__(self, module, optimizer, dp_size, dp_rank, tp=1, engine=None):
        self.module, self.optimizer, self.engine = module, optimizer, engine
        self.dp_size, self.dp_rank, self.tp = dp_size, dp_rank, tp

    def parameters(self):
        return [p for p in self.module.parameters() if p.requires_grad]


def adamw(module, cfg: TrainConfig, eps: float = 1e-8):
    return torch.optim.AdamW(
        parameter_groups(module, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=eps
    )


def setup(args, env: D.DistEnv, cfg: TrainConfig) -> Setup:
    s, world = args.strategy, env.world_size
    if s != "single" and world < 2:
        raise SystemExit(f"--strategy {s} needs torchrun with 2 or more processes")
    model = build_model(args).to(env.device)
    if s in ("single", "manual"):
        if s == "manual":
            D.broadcast_parameters(model)  # start equal (they already are: same seed)
        n = world if s == "manual" else 1
        return Setup(
            model, adamw(model, cfg, args.adam_eps), n, env.rank if n > 1 else 0
        )
    if s == "bucketed":  # DDP by hand: buckets all-reduced during backward
        ddp = D.BucketedDDP(model, bucket_size_mb=args.bucket_mb)
        return Setup(ddp, adamw(model, cfg, args.adam_eps), world, env.rank)
    if s in ("zero1_hand", "zero2_hand"):  # ZeRO by hand: AdamW state for 1/N
        optimizer = D.ShardedOptimizer(
            parameter_groups(model, cfg.weight_decay), torch.optim.AdamW,
            stage=int(s[4]), bucket_size_mb=args.bucket_mb, lr=cfg.lr,
            betas=cfg.betas, eps=args.adam_eps,
        )  # fmt: skip
        return Setup(model, optimizer, world, env.rank)
    if s == "fsdp_hand":  # FSDP by hand: each block gathered only while it runs
        st = Setup(model, None, world, env.rank)
        st.fsdp = D.FSDPByHand(model)  # shards in place: the optimizer sees shards
        st.optimizer = adamw(model, cfg, args.adam_eps)
        return st
    if s == "ring":  # every rank: the whole batch, its 1/N of the positions
        return Setup(model, adamw(model, cfg, args.adam_eps), 1, 0)
    if s == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model)  # broadcasts rank 0's parameters, then syncs every backward
        return Setup(ddp, adamw(model, cfg, args.adam_eps), world, env.rank)
    if s in ("fsdp2", "tp", "fsdp2_tp"):
        from torch.distributed.device_mesh import init_device_mesh

        tp = {"fsdp2": 1, "tp": world, "fsdp2_tp": args.tp}[s]
        if world % tp:
            raise SystemExit(f"{world} processes do not split into groups of {tp}")
        mesh = init_device_mesh(
            env.device.type, (world // tp, tp), mesh_dim_names=("dp", "tp")
        )
        if tp > 1:
            D.tensor_parallelize(model, mesh["tp"])
        if s != "tp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                      reduce_dtype=torch.float32)  # fmt: skip
            kw = {"mesh": mesh["dp"]}
            if args.mixed_precision:
                kw["mp_policy"] = mp
            for block in model.transformer.h:
                fully_shard(block, **kw)  # each block gathered only while it runs
            fully_shard(model, **kw)  # the rest: embeddings, final norm
        dp_rank = mesh["dp"].get_local_rank()
        return Setup(
            model, adamw(model, cfg, args.adam_eps), world // tp, dp_rank, tp=tp
        )
    if s == "pp":
        stage_range = D.split_layers(args.n_layer, world)[env.rank]
        stage = D.GPTStage(model, *stage_range)
        params = list(stage.parameters())
        opt = torch.optim.AdamW(
            [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
            lr=cfg.lr, betas=cfg.betas, eps=args.adam_eps,
        )  # fmt: skip
        st = Setup(stage, opt, 1, 0)
        st.ends = dist.new_group([0, world - 1])  # the stages holding the tied weight
        return st
    return deepspeed_setup(args, env, cfg, model)


def deepspeed_setup(args, env, cfg, model) -> Setup:
    """DeepSpeed's ZeRO stage 1, 2 or 3 around our own model and AdamW."""
    import sys

    if env.device.type == "cpu":  # CPU processes (float64 too) even on a GPU machine
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401 (the module patched below)

    # DeepSpeed's communication backend compiles a shared-memory all-reduce with g++
    # at start-up (minutes, once per machine). Only its inference all-reduce uses it;
    # training goes through torch.distributed. Skip the build.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # joins our group
    config = {
        "train_micro_batch_size_per_gpu": cfg.batch_size // env.world_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "gradient_clipping": cfg.grad_clip,
        # stages 1 and 2 reduce each rank's share of a gradient bucket to it (N
        # reduces); by default they all-reduce the whole bucket: 50% more traffic
        "zero_optimization": {
            "stage": int(args.strategy[-1]),
            "use_multi_rank_bucket_allreduce": False,
        },  # fmt: skip
        "zero_allow_untested_optimizer": True,  # our torch AdamW, not DeepSpeed's
        "steps_per_print": 10**9,
    }
    optimizer = adamw(model, cfg, args.adam_eps)  # groups by shape: before sharding
    if config["zero_optimization"]["stage"] == 3:
        # ZeRO-3 partitions the model with zero.Init, whose dtype must be fp16, bf16
        # or fp32. DeepSpeed hands it the model's: float64 is refused where its
        # accelerator reports fp16 (GPUs, Macs, CPUs with AVX512-FP16) and, through
        # an operator-precedence slip, replaced by bf16 elsewhere. We partition the
        # model ourselves and name fp32, the dtype of ZeRO's master weights: zero.Init
        # uses it only for tensors created inside it; partitioning casts nothing.
        deepspeed.zero.Init(module=model, config_dict_or_path=config,
                            dtype=torch.float32)  # fmt: skip
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=config, dist_init_required=False
    )
    return Setup(engine, optimizer, env.world_size, env.rank, engine=engine)


# ----------------------------------------------------------------------------- one step


def loss_of(module, x, y) -> torch.Tensor:
    logits = module(x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def train_step(args, env, cfg, st: Setup, batches, schedule=None) -> float:
    """One optimizer step over ``accum`` micro-batches; returns the global mean loss."""
    total = torch.zeros((), dtype=torch.float64)
    if args.strategy == "pp":
        x, y = zip(*(next(batches) for _ in range(cfg.grad_accum_steps)), strict=True)
        x, y = torch.cat(x), torch.cat(y)
        losses = []
        if st.module.first:
            schedule.step(x.to(env.device))
        else:
            schedule.step(target=y.to(env.device), losses=losses)
        loss = torch.stack(losses).mean().double() if losses else total
        sync_tied_weights(st, env, st.ends)
        clip_pipeline(st, cfg.grad_clip)
        total = loss.detach().cpu()
        # the loss lives on the last stage; every rank reports it
        dist.broadcast(total, src=env.world_size - 1)
    elif st.engine is not None:  # DeepSpeed: it scales, reduces, clips and steps
        for _ in range(cfg.grad_accum_steps):
            x, y = (t.to(env.device) for t in next(batches))
            loss = loss_of(st.engine, x, y)
            st.engine.backward(loss)  # divides by the accumulation steps itself
            st.engine.step()  # the optimizer steps at the last micro-batch only
            total += loss.detach().double().cpu() / cfg.grad_accum_steps
        total = total.to(env.device)
        dist.all_reduce(total)
        return float(total / env.world_size)
    else:
        for k in range(cfg.grad_accum_steps):
            x, y = (t.to(env.device) for t in next(batches))
            last = k == cfg.grad_accum_steps - 1
            sync = nullcontext()
            if args.strategy in ("ddp", "bucketed") and not last:
                sync = st.module.no_sync()  # accumulate locally; all-reduce once
            if args.strategy in ("fsdp2", "fsdp2_tp"):  # the same: reduce-scatter once
                st.module.set_requires_gradient_sync(last)
            if args.strategy == "fsdp_hand":
                st.fsdp.set_requires_gradient_sync(last)
            with sync:
                if args.strategy == "ring":  # this rank's share of the mean loss
                    loss = D.sequence_parallel_loss(st.module, x, y)
                else:
                    loss = loss_of(st.module, x, y)
                loss = loss / cfg.grad_accum_steps
                loss.backward()
            total += loss.detach().double().cpu()
        if args.strategy == "manual":
            D.allreduce_gradients(st.module, env.world_size)
        if args.strategy == "bucketed":
            st.module.finish_gradient_synchronization()
        if args.strategy == "ring":  # the ranks' shares add up to the loss: sum
            D.allreduce_sequence_gradients(st.module)
            total = total.to(env.device)
            dist.all_reduce(total)
        if st.dp_size > 1:  # the mean of the ranks' losses is the global batch's loss
            total = total.to(env.device)
            dist.all_reduce(total)  # tensor-parallel copies are equal: mean over all
            total /= env.world_size
        if args.strategy in ("single", "manual", "ddp", "bucketed", "ring"):
            torch.nn.utils.clip_grad_norm_(st.parameters(), cfg.grad_clip)
        elif args.strategy == "fsdp_hand":  # one all-reduce of the squared norm
            st.fsdp.clip_grad_norm_(cfg.grad_clip)
        elif args.strategy in ("zero1_hand", "zero2_hand"):  # the shards' norm, too
            st.optimizer.clip_grad_norm_(cfg.grad_clip)
        else:
            D.clip_gradients(st.parameters(), cfg.grad_clip)
    st.optimizer.step()
    st.optimizer.zero_grad(set_to_none=True)
    return float(total)


def sync_tied_weights(st: Setup, env, group) -> None:
    """Pipeline: the first stage's embedding and the last stage's head are one tensor;
    sum their gradients so both copies take the same step."""
    stage = st.module
    if not stage.tied:  # an untied head is a parameter of its own
        return
    if stage.first:
        dist.all_reduce(stage.transformer.wte.weight.grad, group=group)
    elif stage.last:
        dist.all_reduce(stage.lm_head.weight.grad, group=group)


def clip_pipeline(st: Setup, max_norm: float) -> None:
    """Global gradient norm over all stages (the tied copy counted once), then scale."""
    stage = st.module
    params = [p for n, p in stage.named_parameters()
              if not (n == "lm_head.weight" and stage.tied)]  # fmt: skip
    sq = torch.stack([p.grad.pow(2).sum() for p in params]).sum()
    dist.all_reduce(sq)
    scale = torch.clamp(max_norm / (sq.sqrt() + 1e-6), max=1.0)
    for p in stage.parameters():
        p.grad.mul_(scale)


def final_parameters(args, st: Setup, env) -> dict[str, torch.Tensor] | None:
    """The whole trained model on rank 0 (GPT names, tied weights once)."""
    if args.strategy == "pp":
        stage = st.module
        mine = {
            n: p.detach().cpu()
            for n, p in stage.named_parameters()
            if not (n == "lm_head.weight" and stage.tied)
        }  # stage 0 has wte
        parts = [None] * env.world_size
        dist.all_gather_object(parts, mine)
        return (
            {k: v for part in parts for k, v in part.items()} if env.is_main else None
        )
    if st.engine is not None:
        return deepspeed_parameters(st)
    if args.strategy == "fsdp_hand":  # collective: every rank gathers the shards
        full = st.fsdp.full_parameters()
        return full if env.is_main else None
    full = D.full_state_dict(st.module, tp=st.tp)
    return full if env.is_main else None


DCP_STRATEGIES = ("single", "manual", "ddp", "fsdp2")


def dcp_state(st: Setup) -> dict:
    """Model and optimizer state under the model's own parameter names, each rank's
    shards only: the same checkpoint loads into any strategy and any world size."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(st.module, st.optimizer)
    return {"model": model_sd, "optim": optim_sd}


def save_dcp(args, st: Setup, env, step: int) -> None:
    import torch.distributed.checkpoint as dcp

    solo = env.world_size == 1  # one process: no process group to coordinate
    dcp.save(dcp_state(st), checkpoint_id=str(args.save_dcp), no_dist=solo)
    if env.is_main:
        info = {"step": step, "strategy": args.strategy, "world_size": env.world_size}
        (args.save_dcp / "progress.json").write_text(json.dumps(info))


def resume_dcp(args, st: Setup, env) -> int:
    """Load a DCP checkpoint into this strategy's model and optimizer; its step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = dcp_state(st)  # the layout this strategy wants: DCP fills it in place
    dcp.load(state, checkpoint_id=str(args.resume_dcp), no_dist=env.world_size == 1)
    set_state_dict(st.module, st.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])  # fmt: skip
    return json.loads((args.resume_dcp / "progress.json").read_text())["step"]


def deepspeed_parameters(st) -> dict[str, torch.Tensor]:
    """ZeRO-3 holds 1/N of every parameter: gather them whole (on every rank)."""
    import deepspeed

    params = list(st.engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {n: p.detach().clone().cpu()
                for n, p in st.engine.module.named_parameters()}  # fmt: skip


# --------------------------------------------------------------------------------- main


def main(argv=None) -> None:
    args = parse_args(argv)
    env = D.init_distributed("cpu" if args.dtype == "float64" else None)
    names = args.strategy.split(",")
    for name in names:
        one = argparse.Namespace(**vars(args) | {"strategy": name})
        if len(names) > 1:  # several strategies in one launch: OUT/<strategy>/
            one.out = args.out / name
        if name == "single" and env.world_size > 1:  # the reference: rank 0 alone
            if env.is_main:
                run(one, D.DistEnv(0, 1, 0, env.device))
        else:
            run(one, env)
        if dist.is_initialized():
            dist.barrier()
    D.shutdown()


def run(args, env: D.DistEnv) -> None:
    """Train ``args.steps`` steps with one strategy; rank 0 writes the results."""
    cfg = train_config(args)
    if args.batch % args.accum:
        raise SystemExit("--batch must be a multiple of --accum")
    st = setup(args, env, cfg)
    micro = cfg.batch_size // st.dp_size
    if micro * st.dp_size != cfg.batch_size:
        raise SystemExit(f"micro-batch {cfg.batch_size} does not split over "
                         f"{st.dp_size} ranks")  # fmt: skip
    batches = D.rank_batches(train_ids(), args.context, micro, st.dp_size, st.dp_rank,
                             args.seed)  # fmt: skip
    schedule = pipeline_schedule(args, env, st, cfg) if args.strategy == "pp" else None

    start = 0
    if (args.save_dcp or args.resume_dcp) and args.strategy not in DCP_STRATEGIES:
        raise SystemExit(f"sharded checkpoints here: {', '.join(DCP_STRATEGIES)}")
    if args.resume_dcp:
        start = resume_dcp(args, st, env)
        for _ in range(start * cfg.grad_accum_steps):  # the data where the run was
            next(batches)
    losses, times, comm = [], [], None
    if args.strategy == "fsdp_hand":
        st.fsdp.reset_peak()
    stop = args.steps if args.stop_after is None else min(args.stop_after, args.steps)
    for step in range(start, stop):
        for group in st.optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        counting = args.count_comm and step == start + 2
        t0 = time.perf_counter()
        with D.count_collectives(env.world_size) if counting else nullcontext() as log:
            loss = train_step(args, env, cfg, st, batches, schedule)
        times.append(time.perf_counter() - t0)
        if counting:
            comm = log.summary() | {"sent_bytes_ring": log.sent()}
        losses.append(loss)
        if env.is_main:
            print(f"{args.strategy:>8} step {step:3d}  loss {loss:.6f}  "
                  f"{times[-1] * 1e3:6.1f} ms", flush=True)  # fmt: skip

    if args.save_dcp:
        save_dcp(args, st, env, stop)
    params = final_parameters(args, st, env)
    held = held_per_rank(st, env)
    peak = gathered(env, st.fsdp.peak_param_bytes) if hasattr(st, "fsdp") else None
    states = None  # bytes of parameters, gradients and AdamW state, measured
    if isinstance(st.optimizer, D.ShardedOptimizer):
        states = gathered(env, st.optimizer.state_bytes())
    timeline = pipeline_timeline(schedule, env) if schedule is not None else None
    if env.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in params.items()},
                  str(args.out / "final.safetensors"))  # fmt: skip
        record = {
            "strategy": args.strategy, "dtype": args.dtype,
            "world_size": env.world_size, "dp_size": st.dp_size, "tp": st.tp,
            "threads_per_process": torch.get_num_threads(),
            "model": vars(model_config(args)), "global_batch": args.batch,
            "accum": args.accum, "first_step": start, "losses": losses,
            "step_s": times, "comm_step": comm,
            "params_total": sum(v.numel() for v in params.values()),
            "params_held_per_rank": held,
        }  # fmt: skip
        if timeline is not None:
            record["timeline"] = timeline
        if peak is not None:  # whole parameters alive at once, at most, per rank
            record["peak_param_bytes"] = peak
        if states is not None:
            record["state_bytes"] = states
        (args.out / "losses.json").write_text(json.dumps(record, indent=1))
        print(f"wrote {args.out}/final.safetensors and losses.json", flush=True)


def gathered(env, value) -> list:
    """``value`` of every rank, in rank order (collective)."""
    if env.world_size == 1:
        return [value]
    out = [None] * env.world_size
    dist.all_gather_object(out, value)
    return out


def held_per_rank(st: Setup, env) -> list[int]:
    """Parameter elements each rank holds at rest (collective)."""
    params = list(st.module.parameters())
    if st.engine is not None and hasattr(params[0], "ds_tensor"):  # ZeRO-3's shards
        mine = sum(p.ds_tensor.numel() for p in params)
    else:
        mine = D.local_numel(params)
    return gathered(env, mine)


def pipeline_schedule(args, env, st: Setup, cfg):
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    stage = PipelineStage(st.module, env.rank, env.world_size, env.device)
    kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[args.schedule]

    def loss_fn(logits, y):
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    schedule = kind(stage, n_microbatches=cfg.grad_accum_steps, loss_fn=loss_fn)
    schedule.spans = []  # (kind, micro-batch, start, end) of every compute, this rank
    for name in ("forward_one_chunk", "backward_one_chunk"):
        setattr(stage, name, timed(getattr(stage, name), name[0].upper(), schedule))
    return schedule


def timed(fn, kind: str, schedule):
    """Wrap a stage's forward/backward of one micro-batch to record when it ran."""

    def wrapper(chunk, *args, **kwargs):
        t0 = time.perf_counter()  # CLOCK_MONOTONIC: one clock for all local processes
        try:
            return fn(chunk, *args, **kwargs)
        finally:
            schedule.spans.append((kind, chunk, t0, time.perf_counter()))

    return wrapper


def pipeline_timeline(schedule, env) -> list | None:
    """Every rank's compute spans of the last step, on rank 0 (collective)."""
    spans = schedule.spans
    n_last = 2 * schedule._n_microbatches  # one F and one B per micro-batch
    mine = [(env.rank, *span) for span in spans[-n_last:]]
    parts = [None] * env.world_size
    dist.all_gather_object(parts, mine)
    if not env.is_main:
        return None
    rows = [row for part in parts for row in part]
    t0 = min(r[3] for r in rows)
    return [[rank, kind, mb, a - t0, b - t0] for rank, kind, mb, a, b in rows]


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # DTensor's advice on merging collectives over a 2-D mesh: not for tiny models
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    # DeepSpeed still calls collectives under their pre-2.10 names
    warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated")
    main()
