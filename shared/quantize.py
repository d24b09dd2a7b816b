"""Weight-only int8 quantization from scratch: per-channel scales, ``Int8Linear``.

Every output row of a Linear weight gets one scale, ``max|w_row| / 127``; the weight
is stored as int8 ``round(w / scale)`` and multiplied back at run time. Activations
stay in floating point, so only the weights shrink (4x, plus one scale per row).

``quantize_int8(model)`` returns a copy with every ``nn.Linear`` replaced, the output
head included, like torchao's ``Int8WeightOnlyConfig``. A tied head loses its tie:
the token embedding stays fp32 (it is a row lookup, not a matmul) and ``lm_head``
gets its own int8 copy of the matrix.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterable

import torch
from torch import nn

# symmetric range [-127, 127]: -128 is left out so that q and -q both fit (torchao
# uses [-128, 127] with scale max/127.5: the same error bound, a hair finer)
QMAX = 127


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: ``(q (out, in) int8, scale (out,) fp32)``."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1)
    # an all-zero row would divide by zero; any positive scale stores it exactly
    scale = (amax / QMAX).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The weight that ``(q, scale)`` stands for: ``q * scale`` per row."""
    return (q.to(torch.float32) * scale[:, None]).to(dtype)


class Int8Linear(nn.Module):
    """A Linear layer whose weight is stored as int8 with one fp32 scale per row."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # buffers, not Parameters: int8 weights are not trained, but are saved
        self.register_buffer(
            "weight", torch.zeros(out_features, in_features, dtype=torch.int8)
        )
        self.register_buffer("scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Quantize an ``nn.Linear`` (its weight per row; the bias stays as it is)."""
        out = cls(linear.in_features, linear.out_features, linear.bias is not None)
        q, scale = quantize_per_channel(linear.weight)
        out.weight.copy_(q)
        out.scale.copy_(scale)
        if linear.bias is not None:
            out.bias = nn.Parameter(linear.bias.detach().clone())
        return out.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (x @ q^T) * scale == x @ (q * scale)^T: each output feature has one scale,
        # so it moves out of the matmul. Casting q to x's dtype is exact (|q| <=
        # 127); CPUs have no fast int8 x float matmul, hence the cast. Scaling the
        # (tokens, out) result instead of the (out, in) weight is cheaper when few
        # tokens pass, as in generation: on 1 CPU thread it decodes ~30% faster
        # than F.linear on the dequantized weight, equal on full batches. torchao's
        # weight-only int8 computes it the same way.
        y = (x @ self.weight.to(x.dtype).T) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, weight=int8 per-channel"
        )


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def quantize_int8(model: nn.Module, skip: Iterable[str] = ()) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` turned into an ``Int8Linear``.

    The original model is untouched. ``skip``: module names (``"lm_head"``) or name
    endings (``"c_proj"``) to keep in floating point; skipping ``lm_head`` keeps a
    tied output head tied to the fp32 embedding.
    """
    skip = tuple(skip)
    model = copy.deepcopy(model)  # deepcopy keeps ties: one copy of each tensor
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not _skipped(full, skip):
                setattr(module, child_name, Int8Linear.from_linear(child))
    return model


def to_bf16(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its floating-point weights cast to bfloat16."""
    return copy.deepcopy(model).to(torch.bfloat16)


# ------------------------------------------------------------------------ sizes


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a wrapper subclass (torchao's) counts its inner tensors."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        inner = (getattr(t, n) for n in names)
        return sum(tensor_bytes(x) for x in inner if x is not None)
    return t.numel() * t.element_size()


def _key(t: torch.Tensor) -> tuple:
    if hasattr(t, "__tensor_flatten__"):
        return ("subclass", id(t))
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))


def model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, a tensor shared by two modules once."""
    seen: dict[tuple, int] = {}
    tensors = [*model.parameters(), *model.buffers()]  # both dedupe by identity
    for t in tensors:
        seen[_key(t)] = tensor_bytes(t)
    return sum(seen.values())


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the Linear layers' weights (int8 layers: weight + scales), no biases."""
    total = 0
    for module in model.modules():
        if isinstance(module, Int8Linear):
            total += tensor_bytes(module.weight) + tensor_bytes(module.scale)
        elif isinstance(module, nn.Linear):
            total += tensor_bytes(module.weight)
    return total


# ------------------------------------------------------------- the references


def torchao_int8(model: nn.Module) -> nn.Module:
    """A copy quantized by torchao: every Linear's weight becomes an Int8Tensor."""
    # torchao logs a warning for each CUDA extension a CPU build of torch can't load,
    # and torch one about an Enum torchao registers with torch.compile
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = copy.deepcopy(model)
    quantize_(model, Int8WeightOnlyConfig())
    return model


def dynamic_int8(model: nn.Module) -> nn.Module:
    """A copy quantized by ``torch.ao.quantization.quantize_dynamic`` (deprecated)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation notices, on every call
        return torch.ao.quantization.quantize_dynamic(
            model, {nn.Linear}, dtype=torch.qint8
        )
