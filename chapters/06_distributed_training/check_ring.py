"""Worker of ``test_ring.py``: sequence parallelism on N gloo processes, in float64.

  torchrun --standalone --nproc_per_node 2 check_ring.py --out DIR

Every rank builds the same full tensors and the same model (same seeds) and keeps its
T/N slice of the sequence. Rank 0 writes what the test compares with one process:

- ``attention.safetensors``: the full q, k, v and output gradient, and the gathered
  outputs and q/k/v gradients of ``ring_attention`` and ``ulysses_attention``;
- ``gpt_<variant>.safetensors``: the initial weights, the batches, the summed
  gradients of the first step and the weights after 3 AdamW steps of
  ``sequence_parallel_loss`` (learned positions or RoPE; ring or Ulysses);
- ``result.json``: the summed losses, and the bytes sent by one ring attention
  and ``ulysses_attention`` forward and backward and by one GPT forward and backward
  (``D.count_collectives`` sees the point-to-point sends; all-to-alls added here).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from shared import distributed as D
from shared.distributed.sequence_parallel import (
    allreduce_sequence_gradients,
    ring_attention,
    sequence_parallel_loss,
    sequence_slice,
    ulysses_attention,
)
from shared.model import GPT, GPTConfig
from shared.train import parameter_groups

B, H, T, HEAD_DIM = 2, 4, 32, 8
VARIANTS = {  # name -> (position encoding, attention)
    "learned_ring": ("learned", ring_attention),
    "rope_ring": ("rope", ring_attention),
    "rope_ulysses": ("rope", ulysses_attention),
}
STEPS = 3


class count_traffic(D.count_collectives):  # noqa: N801 (a context manager)
    """``D.count_collectives`` that also records all-to-alls (Ulysses), unless it
    does already: the payload S is the input, (N-1)/N of which leaves the rank."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        seen = len(self.log.calls)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        name = f"{func.namespace}.{func._schema.name.split('::')[-1]}"
        if name == "c10d.alltoall_base_" and len(self.log.calls) == seen:
            self.log.calls.append(("all_to_all", args[1].nbytes))
        return out


def gather(t: torch.Tensor) -> torch.Tensor:
    """The ranks' slices of dim 2 (the sequence), concatenated in rank order."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=2)


def check_attention(n: int) -> tuple[dict[str, torch.Tensor], dict]:
    gen = torch.Generator().manual_seed(0)
    full = {name: torch.randn(B, H, T, HEAD_DIM, generator=gen, dtype=torch.float64)
            for name in ("q", "k", "v", "grad_out")}  # fmt: skip
    local = sequence_slice(T)
    tensors, traffic = dict(full), {}
    for name, attention in (("ring", ring_attention), ("ulysses", ulysses_attention)):
        q, k, v = (full[x][:, :, local].clone().requires_grad_() for x in "qkv")
        with count_traffic(n) as fwd:
            out = attention(q, k, v)
        with count_traffic(n) as bwd:
            out.backward(full["grad_out"][:, :, local])
        tensors |= {f"{name}.out": gather(out.detach())}
        grads = zip("qkv", (q, k, v), strict=True)
        tensors |= {f"{name}.d{x}": gather(t.grad) for x, t in grads}
        traffic[name] = {"forward": fwd.summary(), "backward": bwd.summary()}
    return tensors, traffic


def train_gpt(pos_encoding: str, attention, n: int) -> tuple[dict, dict]:
    config = GPTConfig(vocab_size=64, context_length=T, n_layer=2, n_head=H,
                       n_embd=H * HEAD_DIM, pos_encoding=pos_encoding)  # fmt: skip
    torch.manual_seed(0)
    model = GPT(config).double()
    tensors = {f"init.{k}": v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    losses, traffic = [], {}
    for step in range(STEPS):
        idx = torch.randint(0, config.vocab_size, (B, T + 1), generator=gen)
        tensors[f"batch.{step}"] = idx
        opt.zero_grad(set_to_none=True)
        with count_traffic(n) as fwd:
            loss = sequence_parallel_loss(model, idx[:, :-1], idx[:, 1:],
                                          attention=attention)  # fmt: skip
        with count_traffic(n) as bwd:
            loss.backward()
        if step == 0:
            traffic = {"forward": fwd.summary(), "backward": bwd.summary()}
        allreduce_sequence_gradients(model)
        total = loss.detach().clone()
        dist.all_reduce(total)  # the shares of the loss add up to the mean
        losses.append(total.item())
        if step == 0:
            tensors |= {f"grad.{k}": p.grad.clone()
                        for k, p in model.named_parameters()}  # fmt: skip
        opt.step()
    tensors |= {f"final.{k}": v.clone() for k, v in model.state_dict().items()}
    return tensors, {"losses": losses, "traffic": traffic}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    out = p.parse_args().out
    env = D.init_distributed("cpu")
    n = env.world_size
    tensors, traffic = check_attention(n)
    result = {"world_size": n, "attention_traffic": traffic, "gpt": {},
              "block_bytes": B * H * (T // n) * HEAD_DIM * 8}  # fmt: skip
    files = {"attention": tensors}
    for name, (pos_encoding, attention) in VARIANTS.items():
        tensors, result["gpt"][name] = train_gpt(pos_encoding, attention, n)
        files[f"gpt_{name}"] = tensors
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for name, tensors in files.items():
            save_file({k: v.contiguous() for k, v in tensors.items()},
                      str(out / f"{name}.safetensors"))  # fmt: skip
        (out / "result.json").write_text(json.dumps(result, indent=1))
    D.shutdown()


if __name__ == "__main__":
    main()
