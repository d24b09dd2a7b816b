"""Ring attention on N processes: equal to one process, its traffic, memory and speed.

  torchrun --standalone --nproc_per_node 2 ring_attention.py --out results

Four measurements of ``shared.distributed.sequence_parallel``, each rank holding
T/N positions of the sequence:

1. equality, float64: ``ring_attention``'s output and q/k/v gradients against
   ``causal_attention`` on the whole sequence, and a small GPT's loss and gradients
   (``sequence_parallel_loss`` + summed gradients) against one process;
2. traffic: the bytes each rank sends in one attention layer's forward and backward
   (counted with ``D.count_collectives``), next to the Ulysses formula;
3. memory: the elements of the activations a GPT forward keeps for backward, per
   rank and in one process;
4. time of one attention forward + backward at several lengths T: one process with
   PyTorch's fused kernel, one process running the ring's own code (N = 1), and the
   ring on N processes. Every process runs on one thread.

Rank 0 prints the results and writes ``OUT/ring.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from shared import distributed as D
from shared.attention import causal_attention
from shared.distributed.sequence_parallel import (
    allreduce_sequence_gradients,
    ring_attention,
    sequence_parallel_loss,
    sequence_slice,
)
from shared.model import GPT, GPTConfig

B, H, HEAD_DIM = 1, 4, 32


def gather(t: torch.Tensor) -> torch.Tensor:
    """The ranks' slices of dim 2 (the sequence), concatenated in rank order."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=2)


def qkv(length: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """The same q, k, v and output gradient on every rank (one seed)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, length, HEAD_DIM, generator=gen, dtype=dtype)
            for _ in range(4)]  # fmt: skip


def forward_backward(attention, tensors, local=slice(None), **kw) -> list:
    """Output and q, k, v gradients of ``attention`` on the ``local`` positions."""
    q, k, v, grad = (t[:, :, local].clone() for t in tensors)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, **kw)
    out.backward(grad)
    return [out.detach(), q.grad, k.grad, v.grad]


def equality() -> dict:
    """Largest differences from one process, float64."""
    tensors = qkv(256, torch.float64)
    ring = forward_backward(ring_attention, tensors, sequence_slice(256))
    want = forward_backward(causal_attention, tensors)
    diffs = {
        name: (gather(g) - w).abs().max().item()
        for name, g, w in zip(("out", "dq", "dk", "dv"), ring, want, strict=True)
    }
    config = GPTConfig(vocab_size=64, context_length=64, n_layer=2, n_head=H,
                       n_embd=H * HEAD_DIM, pos_encoding="rope")  # fmt: skip
    torch.manual_seed(0)
    model = GPT(config).double()
    idx = torch.randint(0, 64, (2, 65), generator=torch.Generator().manual_seed(1))
    logits = model(idx[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    share = sequence_parallel_loss(model, idx[:, :-1], idx[:, 1:])
    share.backward()
    allreduce_sequence_gradients(model)
    total = share.detach().clone()
    dist.all_reduce(total)
    diffs["gpt_loss"] = abs(total.item() - loss.item())
    pairs = zip(model.parameters(), want_grads, strict=True)
    diffs["gpt_grads"] = max((p.grad - g).abs().max().item() for p, g in pairs)
    return diffs


def traffic(length: int) -> dict:
    """Bytes this rank sends in one attention layer, float32 (B, H, T, d)."""
    tensors = qkv(length, torch.float32)
    local = sequence_slice(length)
    q, k, v, grad = (t[:, :, local].clone().requires_grad_() for t in tensors)
    n = dist.get_world_size()
    with D.count_collectives(n) as fwd:
        out = ring_attention(q, k, v)
    with D.count_collectives(n) as bwd:
        out.backward(grad)
    block = q.numel() * q.element_size()  # one (B, H, T/N, d) tensor
    return {"shape": [B, H, length, HEAD_DIM], "kv_block_bytes": 2 * block,
            "forward": fwd.payload("send"), "backward": bwd.payload("send"),
            # q, k, v to heads and the output back: (N-1)/N of each leaves the rank
            "ulysses_forward": 4 * block * (n - 1) // n}  # fmt: skip


def saved_elements(model: torch.nn.Module, run) -> int:
    """Elements of the tensors autograd keeps for backward while ``run()`` runs:
    activations only (not the model's parameters and buffers, nor views of them),
    each storage once."""
    model_state = [*model.parameters(), *model.buffers()]
    skip = {t.untyped_storage().data_ptr() for t in model_state}
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[s.data_ptr()] = s.nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values())


def activations(length: int) -> dict:
    """Activation elements kept by a GPT forward: one process vs each rank."""
    config = GPTConfig(vocab_size=64, context_length=length, n_layer=2, n_head=H,
                       n_embd=H * HEAD_DIM, pos_encoding="rope")  # fmt: skip
    torch.manual_seed(0)
    model = GPT(config)
    x, y = torch.randint(0, 64, (2, B, length))
    mine = saved_elements(model, lambda: sequence_parallel_loss(model, x, y))
    per_rank = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
    dist.all_gather(per_rank, torch.tensor([mine]))
    return {"T": length, "one_process": saved_elements(model, lambda: model(x, y)),
            "per_rank": [int(e) for e in per_rank]}  # fmt: skip


def seconds(work, repeats: int) -> float:
    """Median wall time of ``work()`` after one warm-up; the slowest rank's."""
    times = []
    for _ in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    slowest = torch.tensor(statistics.median(times[1:]))
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest.item()


def timing(lengths: list[int], repeats: int) -> list[dict]:
    """One attention forward + backward, float32: one process (every rank runs it,
    one core each) with the fused kernel and with the ring's code, and the ring."""
    n, rank = dist.get_world_size(), dist.get_rank()
    alone = [dist.new_group([r]) for r in range(n)][rank]  # a ring of one
    rows = []
    for length in lengths:
        tensors, local = qkv(length, torch.float32), sequence_slice(length)
        fused = partial(forward_backward, causal_attention, tensors)
        same_code = partial(forward_backward, ring_attention, tensors, group=alone)
        ring = partial(forward_backward, ring_attention, tensors, local)
        rows.append({"T": length, "one_process_fused_s": seconds(fused, repeats),
                     "one_process_ring_code_s": seconds(same_code, repeats),
                     f"ring_{n}_processes_s": seconds(ring, repeats)})  # fmt: skip
    return rows


def report(r: dict) -> None:
    """The results as a few readable lines."""
    n, d, b = r["world_size"], r["max_diff"], r["bytes_per_layer"]
    print(
        f"ring attention on {n} processes, float64, max |difference| from one "
        "process:\n  " + "  ".join(f"{k} {v:.1e}" for k, v in d.items())
    )
    print(
        f"bytes each rank sends per attention layer, float32 {tuple(b['shape'])}: "
        f"forward {b['forward']:,} (N-1 = {n - 1} x {b['kv_block_bytes']:,} of K "
        f"and V), backward {b['backward']:,}; Ulysses "
        f"forward {b['ulysses_forward']:,}"
    )
    a = r["activations"]
    share = max(a["per_rank"]) / a["one_process"]
    print(
        f"activation elements a GPT forward keeps (T={a['T']}): one process "
        f"{a['one_process']:,}, per rank "
        f"{', '.join(f'{e:,}' for e in a['per_rank'])} ({share:.1%})"
    )
    print(
        f"one attention forward + backward, seconds (slowest rank; B={B}, H={H}, "
        f"d={HEAD_DIM}, float32):"
    )
    print(f"{'T':>6} {'fused, 1 process':>17} {'ring code, 1':>13} {f'ring, {n}':>9}")
    for row in r["timing"]:
        t = list(row.values())
        print(f"{t[0]:>6} {t[1]:>17.3f} {t[2]:>13.3f} {t[3]:>9.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--lengths", default="256,1024,4096")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    env = D.init_distributed("cpu")
    torch.set_num_threads(1)
    lengths = [int(x) for x in args.lengths.split(",")]
    result = {"world_size": env.world_size, "max_diff": equality(),
              "bytes_per_layer": traffic(1024), "activations": activations(1024),
              "timing": timing(lengths, args.repeats)}  # fmt: skip
    if env.is_main:
        report(result)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ring.json").write_text(json.dumps(result, indent=1))
    D.shutdown()


if __name__ == "__main__":
    main()
