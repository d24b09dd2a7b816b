"""Counting a GPT: parameters by component, weight memory, training FLOPs per token,
and how much of the machine's peak a run uses (MFU).

Models are built on PyTorch's ``meta`` device, so even GPT-2 1.5B is counted without
allocating a single weight, and the counts are those of the real ``shared.model.GPT``.
"""

from __future__ import annotations

import time
from collections import Counter

import torch

from shared.model import GPT, GPTConfig

BYTES_PER_PARAM = {"fp32": 4, "bf16": 2}


def _component(name: str) -> str:
    if name.startswith("transformer.wte"):
        return "token embedding"
    if name.startswith("transformer.wpe"):
        return "position embedding"
    if ".attn." in name:
        return "attention"
    if ".mlp." in name:
        return "feed-forward"
    if name.startswith("lm_head"):
        return "output head"
    return "norms"  # ln_1, ln_2, ln_f


def parameter_counts(config: GPTConfig) -> dict[str, int]:
    """Parameters per component (tied output head counted once, as the embedding)."""
    with torch.device("meta"):
        model = GPT(config)
    counts: Counter[str] = Counter()
    for name, p in model.named_parameters():  # shared (tied) tensors are listed once
        counts[_component(name)] += p.numel()
    order = ["token embedding", "position embedding", "attention", "feed-forward"]
    order += ["norms", "output head"]
    out = {k: counts[k] for k in order if k in counts}
    out["total"] = sum(counts.values())
    return out


def weight_memory_bytes(n_params: int, dtype: str = "fp32") -> int:
    """Bytes needed to hold ``n_params`` weights in ``dtype`` ("fp32" or "bf16")."""
    return n_params * BYTES_PER_PARAM[dtype]


def flops_per_token(config: GPTConfig, seq_len: int | None = None) -> dict[str, int]:
    """Training FLOPs per token (forward + backward): 6 N + 12 L T d.

    Convention of Kaplan et al. 2020 ("Scaling Laws for Neural Language Models",
    Table 1: C_forward = 2N + 2 n_layer n_ctx d_attn, backward = 2x forward) in the form
    of Chowdhery et al. 2022 (PaLM, Appendix B: 6N + 12 L H Q T), also used by
    nanoGPT's ``estimate_mfu``. Here N is the parameters that take part in a matrix
    multiply for every token: all of them except the position table (a lookup), and
    with the token-embedding lookup replaced by the output head (same V x d matrix when
    tied). The attention term counts q k^T and weights @ v over all T keys (the causal
    mask's saving is ignored, as in those papers).
    """
    t = seq_len or config.context_length
    counts = parameter_counts(config)
    n_matmul = counts["total"] - counts.get("position embedding", 0)
    if not config.tie_weights:  # the lookup table is separate from the head
        n_matmul -= counts["token embedding"]
    dense = 6 * n_matmul
    attention = 12 * config.n_layer * t * config.n_embd
    return {
        "N": n_matmul,
        "6N": dense,
        "attention": attention,
        "total": dense + attention,
    }


# dense bf16 tensor-core peaks from the vendors' data sheets (no sparsity)
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def measure_peak_flops(
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    size: int = 1024,
    repeats: int = 20,
) -> float:
    """Best-of FLOP/s of a square matmul: a practical peak for this machine."""
    device = torch.device(device or "cpu")
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best


def peak_flops(device: torch.device | str | None = None) -> tuple[float, str]:
    """Peak FLOP/s for MFU and where the number comes from."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value, f"{name}: data-sheet dense bf16 peak"
    value = measure_peak_flops(device)
    return value, f"{device.type}: measured fp32 1024x1024 matmul (best of 20)"


def mfu(tokens_per_s: float, flops_per_tok: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak."""
    return tokens_per_s * flops_per_tok / peak
