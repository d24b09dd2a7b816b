"""The four collectives on N processes, shown on small tensors, then timed.

  torchrun --standalone --nproc_per_node 2 collectives.py --out results/collectives.json

Each rank starts with its own tensor (rank r holds r + 1 in every entry), runs
all-reduce, all-gather, reduce-scatter and broadcast, and prints what it holds after
each. Then it times all-reduce and all-gather of 4 KiB to ``--max-mib`` MiB buffers
and records the payload each call handed to the backend (``count_collectives``), so
the notebook can set bytes against seconds. Rank 0 writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from shared import distributed as D


def show(env: D.DistEnv, what: str, t: torch.Tensor) -> str:
    """Every rank's tensor after a collective, one line each, in rank order."""
    lines = [None] * env.world_size
    dist.all_gather_object(lines, f"rank {env.rank}: {t.tolist()}")
    return f"{what}\n  " + "\n  ".join(lines)


def demo(env: D.DistEnv) -> list[str]:
    n, r = env.world_size, env.rank
    out = []
    x = torch.full((4,), float(r + 1))
    out.append(show(env, "start (rank r holds r + 1)", x))
    y = x.clone()
    dist.all_reduce(y)  # every rank: the sum
    out.append(show(env, "all_reduce (sum)", y))
    g = torch.empty(4 * n)
    dist.all_gather_single(g, x)  # every rank: all pieces, in rank order
    out.append(show(env, "all_gather", g))
    s = torch.empty(4 // n)
    dist.reduce_scatter_single(s, torch.arange(4.0) + 10 * r)  # rank r: sum of slice r
    out.append(show(env, "reduce_scatter of [0 1 2 3] + 10 r (rank r: slice r)", s))
    b = x.clone()
    dist.broadcast(b, src=0)  # every rank: rank 0's tensor
    out.append(show(env, "broadcast from rank 0", b))
    return out


def timing(env: D.DistEnv, max_mib: float, repeats: int) -> list[dict]:
    rows = []
    size = 1024  # floats: 4 KiB
    while size * 4 <= max_mib * 2**20:
        buf = torch.ones(size)
        out = torch.empty(size * env.world_size)
        for kind in ("all_reduce", "all_gather"):
            times = []
            for _ in range(repeats):
                dist.barrier()
                t0 = time.perf_counter()
                with D.count_collectives(env.world_size) as log:
                    if kind == "all_reduce":
                        dist.all_reduce(buf)
                    else:
                        dist.all_gather_single(out, buf)
                times.append(time.perf_counter() - t0)
            rows.append({"kind": kind, "payload_bytes": log.payload(),
                         "sent_bytes_ring": log.sent(),
                         "median_s": statistics.median(times)})  # fmt: skip
        size *= 4
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-mib", type=float, default=16)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    env = D.init_distributed("cpu")
    lines = demo(env)
    rows = timing(env, args.max_mib, args.repeats)
    if env.is_main:
        print("\n".join(lines), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"world_size": env.world_size, "demo": lines, "timing": rows}
        args.out.write_text(json.dumps(record, indent=1))
    D.shutdown()


if __name__ == "__main__":
    main()
