"""How big should a gradient bucket be? Data-parallel steps timed at many bucket sizes.

  torchrun --standalone --nproc_per_node 2 overlap.py --out runs/overlap
  torchrun --standalone --nproc_per_node 2 overlap.py --out runs/quick --quick

Each rank runs a float32 ``GPT`` on its share of a global batch of random token ids
(the speed of a step does not depend on the text) and synchronises the gradients in
one of these ways, all of them side by side in one run:

- ``compute``: no communication at all (the floor: what overlap could reach);
- ``per_tensor``: after backward, one blocking all-reduce per tensor
  (``D.allreduce_gradients``);
- ``after``: after backward, one all-reduce of all gradients in one flat buffer;
- ``bucketed``: ``BucketedDDP`` at each bucket size, all-reducing during backward
  (``None``: one bucket, launched when the last gradient is ready);
- ``no_rebuild``: the same at one size, buckets kept in reverse parameter order;
- ``torch_ddp``: PyTorch's ``DistributedDataParallel`` (25 MiB buckets; it waits
  for its buckets at the end of backward, so its backward time holds the waiting).

The variants take turns step by step (so a slow moment of the machine hits them all)
after ``--warmup`` untimed rounds; before each step the ranks meet at a barrier.
A step is zeroing, forward, backward and synchronisation (the optimizer's update is
the same for all and left out). Rank 0 writes ``OUT/overlap.json``: per variant the
medians over the steps of the step, forward and backward times (slowest rank) and
of the exposed communication (``exposed_s``: how long the last rank to finish
backward still waits for the gradients), every rank's raw times, and the buckets;
the time of one all-reduce by size (``allreduce_s``); and the timeline of one step
at ``--timeline-mb`` on both ranks (``BucketedDDP.events``).

On CPU processes gloo's all-reduce is CPU work too (copies, sums, loopback TCP), so
with as many processes as cores the communication threads take time from backward:
overlap hides communication, but backward gets slower. On GPUs, NCCL's transfers run
beside the compute kernels and overlap is where data parallelism's speed comes from.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from shared import distributed as D
from shared.distributed.bucketed import BucketedDDP
from shared.model import GPT, GPTConfig

SIZES = [1e-9, 0.01, 0.1, 0.5, 1.0, 2.0, 4.0, 8.0, None]  # MiB; 1e-9: one per tensor
QUICK = dict(n_layer=2, n_embd=64, n_head=4, context=64, steps=2, warmup=1,
             sizes=[1e-9, 0.1, None])  # fmt: skip


def bucket_sizes(text: str) -> list[float | None]:
    return [None if t.lower() == "none" else float(t) for t in text.split(",")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=192)
    p.add_argument("--n-head", type=int, default=6)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8, help="global batch (rows per step)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    p.add_argument(
        "--sizes",
        type=bucket_sizes,
        default=SIZES,
        help="bucket sizes in MiB, comma-separated (none: one bucket)",
    )
    p.add_argument("--timeline-mb", type=float, default=1.0)
    p.add_argument("--quick", action="store_true", help="a smoke run (~10 s)")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


class Variant:
    """One way of synchronising gradients, with its own copy of the model."""

    def __init__(self, name: str, kind: str, model, bucket_mb=None, **kw) -> None:
        self.name, self.kind, self.bucket_mb = name, kind, bucket_mb
        self.inner = copy.deepcopy(model)
        self.model = self.inner
        if kind in ("bucketed", "after"):
            self.model = BucketedDDP(self.inner, bucket_mb, **kw)
        elif kind == "torch_ddp":
            self.model = DDP(self.inner, bucket_cap_mb=bucket_mb)
        self.times: list[tuple[float, float, float, float]] = []

    def step(self, x, y, world: int) -> tuple[float, float, float, float]:
        """One step; (step, forward, backward, wait) seconds."""
        self.inner.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = self.model(x, y)[1]
        t1 = time.perf_counter()
        local = self.kind == "after"  # all-reduce after backward: no hooks at work
        with self.model.no_sync() if local else nullcontext():
            loss.backward()
        t2 = time.perf_counter()
        if self.kind in ("bucketed", "after"):
            self.model.finish_gradient_synchronization()
        elif self.kind == "per_tensor":
            D.allreduce_gradients(self.inner, world)
        t3 = time.perf_counter()
        return t3 - t0, t1 - t0, t2 - t1, t3 - t2

    def record(self, env) -> dict:
        """Every rank's times and, per step, the job's view (collective): a step
        lasts as long as its slowest rank, and communication is exposed for as long
        as the last rank to end backward still waits (a faster rank's wait also holds
        the time it waited for the slower one). Medians over the steps."""
        per_rank = [None] * env.world_size
        dist.all_gather_object(per_rank, self.times)
        steps = list(zip(*per_rank, strict=True))  # [step][rank] -> 4 times

        def median(column: int, over) -> float:
            return statistics.median(over(r[column] for r in step) for step in steps)

        out = {"name": self.name, "kind": self.kind, "bucket_mb": self.bucket_mb,
               "step_s": median(0, max), "forward_s": median(1, max),
               "backward_s": median(2, max), "exposed_s": median(3, min),
               "times_per_rank": per_rank}  # fmt: skip
        if isinstance(self.model, BucketedDDP):
            out["n_buckets"] = len(self.model.buckets)
            out["bucket_bytes"] = self.model.bucket_bytes
        return out


def variants(model: GPT, args) -> list[Variant]:
    out = [Variant(kind, kind, model) for kind in ("compute", "per_tensor", "after")]
    out += [Variant(f"bucketed {s}", "bucketed", model, s) for s in args.sizes]
    mb = args.timeline_mb
    out.append(
        Variant(f"no_rebuild {mb}", "bucketed", model, mb, rebuild_buckets=False)
    )
    out.append(Variant("torch_ddp 25", "torch_ddp", model, 25.0))
    return out


def allreduce_times(sizes_mib: list[float], calls: int) -> dict[str, float]:
    """Seconds per all-reduce of a float32 buffer of each size, in a run of
    ``calls`` back-to-back blocking calls (as the buckets of a step would go): the
    latency and bandwidth a bucket pays. Rank 0's view, median of 3 runs."""
    out = {}
    for mib in sizes_mib:
        buffer = torch.zeros(max(1, int(mib * 2**20) // 4))
        runs = []
        for _ in range(4):  # the first untimed
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(calls):
                dist.all_reduce(buffer)
            runs.append((time.perf_counter() - t0) / calls)
        out[str(mib)] = statistics.median(runs[1:])
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    env = D.init_distributed("cpu")
    if args.batch % env.world_size:
        raise SystemExit(f"--batch {args.batch} does not split over {env.world_size}")
    config = GPTConfig(
        vocab_size=args.vocab, context_length=args.context, n_layer=args.n_layer,
        n_head=args.n_head, n_embd=args.n_embd,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT(config)
    g = torch.Generator().manual_seed(1 + env.rank)  # each rank its own rows
    rows = args.batch // env.world_size
    data = torch.randint(0, args.vocab, (rows, args.context + 1), generator=g)
    x, y = data[:, :-1], data[:, 1:]

    start = time.perf_counter()
    sizes = [0.001, 0.01, 0.1, 0.5, 1.0, 2.0, 4.0, 8.0]
    allreduce = allreduce_times(sizes, calls=2 if args.quick else 10)
    runs = variants(model, args)
    for round_ in range(args.warmup + args.steps):
        for v in runs:
            dist.barrier()  # both ranks start the step together
            times = v.step(x, y, env.world_size)
            if round_ >= args.warmup:
                v.times.append(times)
    results = [v.record(env) for v in runs]

    # one step's timeline: buckets against the backward pass, on every rank
    shown = BucketedDDP(copy.deepcopy(model), args.timeline_mb, timeline=True)
    for _ in range(2):  # the first step rebuilds the buckets
        shown.module.zero_grad(set_to_none=True)
        shown.reset_timeline()
        dist.barrier()
        shown(x, y)[1].backward()
        shown.finish_gradient_synchronization()
    events = [None] * env.world_size
    dist.all_gather_object(events, shown.events)

    if env.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        record = {
            "model": vars(config), "world_size": env.world_size,
            "threads_per_process": torch.get_num_threads(),
            "global_batch": args.batch, "steps": args.steps, "warmup": args.warmup,
            "params": n_params, "gradient_mib": 4 * n_params / 2**20,
            "data": "random token ids", "allreduce_s": allreduce,
            "results": results,
            "timeline": {"bucket_mb": args.timeline_mb, "buckets": shown.buckets,
                         "events_per_rank": events},
            "seconds": time.perf_counter() - start,
        }  # fmt: skip
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "overlap.json").write_text(json.dumps(record, indent=1))
        print(f"{n_params / 1e6:.2f}M parameters, {4 * n_params / 2**20:.1f} MiB of "
              f"gradients, {env.world_size} ranks")  # fmt: skip
        print(f"{'variant':>16} {'buckets':>7} {'step ms':>8} {'backward':>8} "
              f"{'exposed comm':>12}")  # fmt: skip
        for r in results:
            print(f"{r['name']:>16} {r.get('n_buckets', ''):>7} "
                  f"{1e3 * r['step_s']:8.1f} {1e3 * r['backward_s']:8.1f} "
                  f"{1e3 * r['exposed_s']:12.1f}")  # fmt: skip
        print("one all-reduce:", ", ".join(f"{mib} MiB {1e3 * t:.2f} ms"
                                          for mib, t in allreduce.items()))  # fmt: skip
        print(f"wrote {args.out / 'overlap.json'}")
    D.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
