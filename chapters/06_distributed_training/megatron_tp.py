"""The course MLP split two ways over 2 processes: DTensor and megatron-core's layers.

  torchrun --standalone --nproc_per_node 2 megatron_tp.py [--dtype float64]

One course ``MLP`` (``shared.model``) is the reference. DTensor's ``ColwiseParallel`` /
``RowwiseParallel`` shard a copy of it, and megatron-core's ``ColumnParallelLinear``
/ ``RowParallelLinear`` get the same weights, each rank its slices. All three run the
same input forward and backward; rank 0 prints the largest differences of the output,
the input gradient and the (gathered) weight gradients.
"""

from __future__ import annotations

import argparse
import copy
import os
import warnings

import torch
import torch.distributed as dist

from shared import distributed as D
from shared.model import MLP, GPTConfig


def megatron_mlp(ref: MLP, dtype: torch.dtype):
    """megatron-core's two parallel layers holding this rank's slices of ``ref``."""
    from megatron.core import parallel_state as ps
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    ps.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size())
    config = ModelParallelConfig(
        tensor_model_parallel_size=dist.get_world_size(),
        use_cpu_initialization=True,  # otherwise it allocates on the current GPU
        perform_initialization=False,  # we copy the slices in below
        params_dtype=dtype,
        gradient_accumulation_fusion=False,  # a fused CUDA kernel (APEX)
    )
    d, hidden = ref.c_fc.in_features, ref.c_fc.out_features
    kw = dict(config=config, init_method=lambda w: None, bias=True)
    fc = ColumnParallelLinear(d, hidden, gather_output=False, **kw)
    proj = RowParallelLinear(hidden, d, input_is_parallel=True, skip_bias_add=False,
                             **kw)  # fmt: skip
    rows = slice(*(ps.get_tensor_model_parallel_rank() * fc.weight.shape[0] + i
                   for i in (0, fc.weight.shape[0])))  # fmt: skip
    with torch.no_grad():
        fc.weight.copy_(ref.c_fc.weight[rows])  # output features: this rank's rows
        fc.bias.copy_(ref.c_fc.bias[rows])
        proj.weight.copy_(ref.c_proj.weight[:, rows])  # input features: its columns
        proj.bias.copy_(ref.c_proj.bias)  # added once, after the all-reduce

    def forward(x):  # megatron's layout is (sequence, batch, hidden)
        h, _ = fc(x.transpose(0, 1))
        out, _ = proj(ref.gelu(h))
        return out.transpose(0, 1)

    return forward, fc, proj, rows


def gather(t: torch.Tensor, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=dim)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    dtype = getattr(torch, p.parse_args().dtype)
    env = D.init_distributed("cpu")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    torch.manual_seed(0)
    ref = MLP(GPTConfig(vocab_size=8, context_length=16, n_layer=1, n_head=4,
                        n_embd=64)).to(dtype)  # fmt: skip
    with torch.no_grad():  # non-zero biases, so that their paths are checked too
        ref.c_fc.bias.normal_(std=0.1)
        ref.c_proj.bias.normal_(std=0.1)
    dtensor = copy.deepcopy(ref)
    mesh = init_device_mesh("cpu", (env.world_size,))
    parallelize_module(dtensor, mesh, {"c_fc": ColwiseParallel(),
                                       "c_proj": RowwiseParallel()})  # fmt: skip
    megatron, fc, proj, rows = megatron_mlp(ref, dtype)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 16, 64, generator=g, dtype=dtype)  # (batch, time, width)
    weights = torch.randn(3, 16, 64, generator=g, dtype=dtype)  # a scalar "loss"
    outs, grads = {}, {}
    for name, fn in [("course MLP", ref), ("DTensor", dtensor), ("megatron", megatron)]:
        xi = x.clone().requires_grad_(True)
        outs[name] = fn(xi)
        (outs[name] * weights).sum().backward()
        grads[name] = xi.grad
    w_grads = {
        "course MLP": ref.c_fc.weight.grad,
        "DTensor": dtensor.c_fc.weight.grad.full_tensor(),
        "megatron": gather(fc.weight.grad, 0),
    }
    if env.is_main:
        print(
            f"{dtype}, 2 ranks; each holds c_fc rows {rows.start}-{rows.stop - 1} "
            f"of {ref.c_fc.out_features} (rank 0)"
        )
        for name in ("DTensor", "megatron"):
            print(
                f"{name:>9} vs course MLP: output "
                f"{(outs[name] - outs['course MLP']).abs().max():.1e}, input grad "
                f"{(grads[name] - grads['course MLP']).abs().max():.1e}, c_fc grad "
                f"{(w_grads[name] - w_grads['course MLP']).abs().max():.1e}"
            )
        print(
            f" megatron vs DTensor:     output "
            f"{(outs['megatron'] - outs['DTensor']).abs().max():.1e}"
        )
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    D.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    warnings.filterwarnings("ignore")  # megatron: Transformer Engine and APEX absent
    main()
