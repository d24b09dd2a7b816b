"""Weight-only quantization from scratch: int8 per channel, int4 in groups.

**int8** (``Int8Linear``): every output row of a Linear weight gets one scale,
``max|w_row| / 127``; the weight is stored as int8 ``round(w / scale)`` and multiplied
back at run time. Activations stay in floating point, so only the weights shrink (4x,
plus one scale per row).

**int4** (``Int4Linear``): 16 levels are too few for one scale per row: a single
large weight would stretch the step for the whole row. So each row is cut into
groups of ``group_size`` input columns (32 ... 128), each with its own fp16 scale,
and stored as codes ``round(w / scale)`` in [-8, 7]. The grid is symmetric around
zero (no zero point to store) but lopsided: within half a step it covers [-8.5,
7.5] steps, so the scale is the smallest that fits the group's max and min into it,
and its sign picks which side of the group gets the longer end (llama.cpp's Q4_0
takes the sign from the largest weight the same way). On the course model's
weights, groups of 32, the relative error is 8.7% (``max|w| / 7``, the plain
symmetric step: 10.0%; asymmetric ``(q - zero) * scale`` over [min, max], which
stores a zero point per group too: 8.2%). Two codes share a byte, so a weight costs
4 bits plus 16 / ``group_size`` bits of scale (4.5 bits for groups of 32, like
Q4_0). Rounding each weight to the nearest step is the simplest choice there is:
GPTQ (Frantar et al., 2022) rounds column by column and corrects the rest of the
row for the error, AWQ (Lin et al., 2023) first rescales the channels that large
activations meet; both keep more quality at 4 bits and are the next step.

``quantize_model(model, bits=4, group_size=32)`` (or ``quantize_int8(model)``)
returns a copy with every ``nn.Linear`` replaced, the output head included, like
torchao's configs. A tied head loses its tie: the token embedding stays fp32 (it is
a row lookup, not a matmul) and ``lm_head`` gets its own quantized copy.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
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


# ------------------------------------------------------------------------- int4

INT4_MIN, INT4_MAX = -8, 7


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes in [-8, 7], shape (..., n) with n even -> uint8 (..., n / 2).

    Each code is stored offset by 8 as a nibble in [0, 15]; column ``2j`` goes into
    the low four bits of byte ``j``, column ``2j + 1`` into the high four.
    """
    if q.shape[-1] % 2:
        raise ValueError(f"need an even number of columns, got {q.shape[-1]}")
    if q.numel() and (q.min() < INT4_MIN or q.max() > INT4_MAX):
        raise ValueError("int4 codes must lie in [-8, 7]")
    u = (q.to(torch.int16) - INT4_MIN).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_int4``: uint8 (..., m) -> int8 codes (..., 2m)."""
    low, high = packed & 0x0F, packed >> 4
    u = torch.stack((low, high), dim=-1).flatten(-2)  # low, high, low, high, ...
    return u.to(torch.int8) + INT4_MIN


def quantize_groupwise(
    w: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 per group of ``group_size`` input columns.

    Returns ``(q (out, in) int8 codes in [-8, 7], scale (out, in / group_size)
    fp16)``; the weight is ``q * scale`` of the code's group, within half a step
    ``|scale| / 2``. The scale is the smallest that keeps that bound.
    """
    out_features, in_features = w.shape
    if group_size < 2 or group_size % 2 or in_features % group_size:
        raise ValueError(
            f"group_size must be even and divide in_features={in_features}, "
            f"got {group_size}"
        )
    groups = w.detach().float().reshape(out_features, -1, group_size)
    hi, lo = groups.amax(dim=-1), groups.amin(dim=-1)
    # Codes -8..7 times the scale hold every weight within half a step on
    # [-8.5, 7.5] steps: the negative end is a step longer. A positive scale gives
    # it to the group's negative side, a negative scale to its positive side; take
    # the orientation that allows the smaller step.
    step_up = torch.maximum(hi / (INT4_MAX + 0.5), -lo / (-INT4_MIN + 0.5))
    step_down = torch.maximum(-lo / (INT4_MAX + 0.5), hi / (-INT4_MIN + 0.5))
    # an all-zero group would divide by zero; any scale stores it exactly
    step = torch.minimum(step_up, step_down).clamp(min=2.0**-24)  # fp16's least
    scale = torch.where(step_up <= step_down, step, -step)
    half = scale.half()
    # fp16 rounding may shrink a scale, pushing the extremes past the half step:
    # round away from zero instead, so the bound holds for the scale as stored
    away = half.nextafter(torch.where(half > 0, 1e4, -1e4).half())
    half = torch.where(half.float().abs() < step, away, half)
    if not torch.isfinite(half).all():
        raise ValueError("a weight is too large for an fp16 scale (> 491,000)")
    q = torch.round(groups / half.float()[..., None]).clamp(INT4_MIN, INT4_MAX)
    return q.to(torch.int8).reshape(out_features, in_features), half


def dequantize_groupwise(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The weight that ``(q, scale)`` stands for: each code times its group's scale."""
    out_features, n_groups = scale.shape
    w = q.to(dtype).reshape(out_features, n_groups, -1)  # codes: exact in any dtype
    # in place: a second (out, in) buffer costs more than the multiply itself
    return w.mul_(scale.to(dtype)[..., None]).reshape(q.shape)


class Int4Linear(nn.Module):
    """A Linear layer whose weight is stored as packed int4, one fp16 scale per group.

    The forward pass unpacks, scales and multiplies: the whole weight is rebuilt in
    the input's dtype on every call. That is dequantize-on-the-fly, not a fused
    int4 kernel (such kernels read the packed bytes inside the matmul and never
    write the full weight out), so it saves memory at rest, not time: decoding at
    GPT-2-124M's shape on one busy CPU thread, fp32 made 17-25 tokens/s, this 2.6-3.1,
    llama.cpp's fused Q4_0 kernel on the same codes 82 (``chapters/09_inference/
    bench_quantize.py``, two runs). A decode step reads every weight once: a kernel
    that reads 4.5 bits a weight instead of 32 is faster, one that writes 32 slower.
    """

    def __init__(
        self, in_features: int, out_features: int, group_size: int, bias: bool = True
    ) -> None:
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"{group_size=} does not divide {in_features=}")
        self.in_features, self.out_features = in_features, out_features
        self.group_size = group_size
        packed = torch.zeros(out_features, in_features // 2, dtype=torch.uint8)
        self.register_buffer("weight", packed)
        groups = in_features // group_size
        self.register_buffer("scale", torch.ones(out_features, groups).half())
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> Int4Linear:
        """Quantize an ``nn.Linear`` group-wise (the bias stays as it is)."""
        out = cls(
            linear.in_features, linear.out_features, group_size, linear.bias is not None
        )
        q, scale = quantize_groupwise(linear.weight, group_size)
        out.weight.copy_(pack_int4(q))
        out.scale.copy_(scale)
        if linear.bias is not None:
            out.bias = nn.Parameter(linear.bias.detach().clone())
        return out.to(linear.weight.device)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight the packed codes and scales stand for."""
        return dequantize_groupwise(unpack_int4(self.weight), self.scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, weight=int4 groups of {self.group_size}"
        )


# ------------------------------------------------------------------ whole models


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def _replace_linears(
    model: nn.Module, make: Callable[[nn.Linear], nn.Module], skip: Iterable[str]
) -> nn.Module:
    """A copy of ``model`` with ``make(linear)`` in place of each ``nn.Linear``."""
    skip = tuple(skip)
    model = copy.deepcopy(model)  # deepcopy keeps ties: one copy of each tensor
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not _skipped(full, skip):
                setattr(module, child_name, make(child))
    return model


def quantize_int8(model: nn.Module, skip: Iterable[str] = ()) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` turned into an ``Int8Linear``.

    The original model is untouched. ``skip``: module names (``"lm_head"``) or name
    endings (``"c_proj"``) to keep in floating point; skipping ``lm_head`` keeps a
    tied output head tied to the fp32 embedding.
    """
    return _replace_linears(model, Int8Linear.from_linear, skip)


def quantize_model(
    model: nn.Module,
    bits: int = 4,
    group_size: int | None = 32,
    skip: Iterable[str] = (),
) -> nn.Module:
    """A weight-only quantized copy: ``bits=8`` per channel, ``bits=4`` per group.

    ``group_size`` is for int4 only (int8's one scale per row is ``None``); a group
    size that does not divide a layer's input width is an error, not a silent skip.
    """
    if bits == 8:
        if group_size is not None:
            raise ValueError("int8 uses one scale per row: pass group_size=None")
        return quantize_int8(model, skip)
    if bits == 4:
        if group_size is None:
            raise ValueError("int4 needs a group_size (32, 64, 128, ...)")
        return _replace_linears(
            model, lambda lin: Int4Linear.from_linear(lin, group_size), skip
        )
    raise ValueError(f"bits must be 8 or 4, got {bits}")


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
    """Bytes of the Linear layers' weights (quantized: codes + scales), no biases."""
    total = 0
    for module in model.modules():
        if isinstance(module, Int8Linear | Int4Linear):
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
