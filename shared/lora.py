"""LoRA: low-rank adapters on a frozen model (Hu et al., 2021), in PEFT's file format.

A frozen linear layer ``y = x W^T + b`` gets a trainable update of rank ``r``:
``y = x W^T + b + (alpha / r) * x A^T B^T`` with ``A`` (r, in) random and ``B``
(out, r) zero, so training starts exactly at the pretrained model. Afterwards the
update merges into the weight, ``W + (alpha / r) B A``, and costs nothing at
inference. ``save_peft_adapter`` writes the adapter the way Hugging Face PEFT does
(``adapter_config.json`` + ``adapter_model.safetensors``), so ``peft`` loads it onto
the model exported by ``shared.hf_export``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from shared.data import write_files

# PEFT names GPT-2's modules the same way (its Conv1D layers hold the weight
# transposed, which PEFT's fan_in_fan_out=True accounts for)
DEFAULT_TARGETS = ("c_attn", "c_proj")  # attention in, and both out-projections
PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-``r`` update scaled by alpha / r."""

    def __init__(
        self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {r}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        # A as nn.Linear's default init (PEFT's too); B = 0 makes the update zero
        a = torch.empty(r, base.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        # the adapter lives where the base weight lives, in its dtype (as PEFT does):
        # a bf16 model's activations cannot be multiplied by fp32 adapters
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(a.to(**like))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **like))
        self.dropout = nn.Dropout(dropout)

    def delta_weight(self) -> torch.Tensor:
        """The update to the weight, (out, in): ``(alpha / r) B A``."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()
        return self.base(x) + self.scaling * update

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the update folded into its weight."""
        linear = nn.Linear(self.base.in_features, self.base.out_features,
                           bias=self.base.bias is not None)  # fmt: skip
        linear.to(self.base.weight.device, self.base.weight.dtype)
        linear.weight.copy_(self.base.weight + self.delta_weight())
        if self.base.bias is not None:
            linear.bias.copy_(self.base.bias)
        return linear


def _matches(name: str, targets: Sequence[str]) -> bool:
    """PEFT's rule: a target names a module by its full name or a dotted suffix."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16.0,
    targets: Sequence[str] = DEFAULT_TARGETS,
    dropout: float = 0.0,
) -> nn.Module:
    """Freeze ``model`` and wrap every matching ``nn.Linear`` in ``LoRALinear``.

    In place; returns the model. Refuses targets that match nothing and a model
    that already has adapters, before it changes anything.
    """
    if lora_layers(model):
        raise ValueError(
            "model already has LoRA adapters (merge_lora first, or start from the "
            "base model)"
        )
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and _matches(n, targets)]  # fmt: skip
    if not names:
        raise ValueError(f"no nn.Linear matches targets {list(targets)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        _replace(model, name, LoRALinear(model.get_submodule(name), r, alpha, dropout))
    model.lora_config = {"r": r, "alpha": alpha, "targets": list(targets),
                         "dropout": dropout}  # fmt: skip
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRA layer of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (in place); the model is plain again."""
    for name, layer in lora_layers(model).items():
        _replace(model, name, layer.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters that will receive gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's names (``...c_attn.lora_A.weight``)."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().clone()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().clone()
    return out


def save_peft_adapter(
    model: nn.Module,
    out_dir: str | Path,
    base_model: str = "",
    extra: dict | None = None,
) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` as PEFT does.

    ``base_model`` goes into ``base_model_name_or_path`` (the folder PEFT loads the
    base from); ``extra`` is stored beside, in ``course.json`` (results, recipe).
    """
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise ValueError("model has no LoRA adapter (use apply_lora first)")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg["r"],
        "lora_alpha": cfg["alpha"],
        "lora_dropout": cfg["dropout"],
        "target_modules": sorted(cfg["targets"]),
        "fan_in_fan_out": True,  # GPT-2's Conv1D stores weights as (in, out)
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
    }
    files = {
        "adapter_config.json": json.dumps(config, indent=2) + "\n",
        "adapter_model.safetensors": save(adapter_state_dict(model)),
    }
    if extra is not None:
        files["course.json"] = json.dumps(extra, indent=1) + "\n"
    write_files(out_dir, files)  # all replaced together, or (full disk) none
    return Path(out_dir)


def load_peft_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Apply a PEFT LoRA adapter folder to a course model (in place; returned)."""
    folder = Path(adapter_dir)
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise ValueError(f"{folder} is not a plain LoRA adapter")
    if config.get("use_rslora"):
        raise ValueError("rank-stabilised LoRA (alpha / sqrt(r)) is not supported")
    apply_lora(model, config["r"], config["lora_alpha"], config["target_modules"],
               config.get("lora_dropout", 0.0))  # fmt: skip
    tensors = load_file(folder / "adapter_model.safetensors")
    layers = lora_layers(model)
    expected = set(adapter_state_dict(model))
    if set(tensors) != expected:
        raise ValueError(
            f"{folder} does not fit this model: missing "
            f"{sorted(expected - set(tensors))[:3]}, unexpected "
            f"{sorted(set(tensors) - expected)[:3]}"
        )
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"])
            layer.lora_B.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"])
    return model
