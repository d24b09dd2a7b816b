"""Bytes autograd saves for backward in a training step of ``GPT(config)``, from the
config alone: block by block, operation by operation.

The rules are those of PyTorch's CPU kernels, checked to the byte against
``shared.memory_profile.saved_tensors`` in ``tests/test_memory.py``. Parameters are
counted on the ``meta`` device, which records shapes and allocates nothing, so a
70B config costs nothing. ``shared.memory`` builds the step's peak on these numbers.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
from torch import nn

from shared.model import GPT, GPTConfig

FP32, INT64 = 4, 8  # bytes; norms, the residual stream and the loss stay fp32


def dtype_bytes(dtype: torch.dtype) -> int:
    """Bytes per element of a float32, bfloat16 or float16 tensor."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return torch.finfo(dtype).bits // 8


@dataclass(frozen=True)
class ParamCounts:
    """Element counts of ``GPT(config)``'s parameters that the estimates need
    (bytes for ``buffer_bytes``)."""

    params: int
    tensors: int
    buffer_bytes: int
    block: int  # all parameters of one block
    attention_matrices: int  # one block's attention weight matrices
    mlp_matrices: int  # one block's feed-forward weight matrices
    final_norm: int
    head: int  # the output matrix (V x C), tied or not
    largest: int  # the largest parameter tensor
    matrices: int  # every >= 2-D parameter: AdamW's weight-decay group


@functools.lru_cache(maxsize=256)
def _counted(*fields) -> ParamCounts:
    """Counts of a config given as its field values (a tuple can be cached)."""
    with torch.device("meta"):
        model = GPT(GPTConfig(*fields))
    params = list(model.parameters())  # tied weights are listed once
    block = model.transformer.h[0]

    def matrices(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters() if p.dim() == 2)

    return ParamCounts(
        params=sum(p.numel() for p in params),
        tensors=len(params),
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        block=sum(p.numel() for p in block.parameters()),
        attention_matrices=matrices(block.attn),
        mlp_matrices=matrices(block.mlp),
        final_norm=sum(p.numel() for p in model.transformer.ln_f.parameters()),
        head=model.lm_head.weight.numel(),
        largest=max(p.numel() for p in params),
        matrices=sum(p.numel() for p in params if p.dim() >= 2),
    )


def parameter_counts(config: GPTConfig) -> ParamCounts:
    """Element counts of ``GPT(config)``'s parameters, counted on ``meta``."""
    return _counted(*dataclasses.astuple(config))


def parameter_tensors(config: GPTConfig) -> tuple[int, int]:
    """(parameters, parameter tensors) of ``GPT(config)``, counted on ``meta``."""
    counts = parameter_counts(config)
    return counts.params, counts.tensors


def block_activation_bytes(
    config: GPTConfig, seq_len: int, dtype=torch.float32
) -> dict:
    """Bytes one transformer block saves for backward, per token, by what saves them.

    The rules are those of PyTorch's CPU kernels (checked against
    ``saved_tensors`` in ``tests/test_memory.py``): a Linear layer keeps its input,
    LayerNorm its input and two statistics, the fused attention kernel q, k, v, its
    output and one log-sum-exp per head, GELU its input, dropout a mask. Under
    ``dtype=torch.bfloat16`` (autocast) matmul operands are 2 bytes, while norms and
    the residual stream stay fp32 (so does attention with dropout, which PyTorch's
    CPU autocast runs in fp32).
    """
    c, nh, t = config.n_embd, config.n_head, seq_len
    h = config.hidden_size
    a = dtype_bytes(dtype)
    drop = config.dropout > 0
    out = {}
    if config.norm == "layernorm":  # input + mean + rstd, then the next Linear's input
        out["norms"] = 2 * (c * FP32 + 2 * FP32 + c * a)
    else:  # input, rms, x / rms, then the next Linear's input
        out["norms"] = 2 * (c * FP32 + FP32 + c * FP32 + c * a)
    if config.attn_impl == "explicit":  # q, k, v, the T x T weights, the output
        weights = nh * t * a * (3 if drop else 1)  # softmax (+ dropout mask, dropped)
        out["attention"] = 3 * c * a + weights + c * a
    elif drop:  # the fused kernel falls back to PyTorch's math path, run in fp32
        out["attention"] = 3 * c * FP32 + 3 * nh * t * FP32 + c * a
    else:  # flash attention: q, k, v, output and a log-sum-exp per head
        out["attention"] = 3 * c * a + c * a + nh * FP32
    if config.pos_encoding == "rope":
        out["attention"] += 2 * c * a  # the rotated q and k
    ffn = 4 * h * a if config.ffn == "swiglu" else 2 * h * a  # gate, up, ... | in, out
    out["feed-forward"] = ffn
    if drop:
        out["dropout masks"] = 2 * c * a  # after attention and after the FFN
    return out


def sublayer_bytes(
    config: GPTConfig, batch_size: int, seq_len: int, dtype=torch.float32
) -> tuple[int, int]:
    """Bytes the attention and the feed-forward sublayer of one block save for a
    batch, each with its norm, its dropout mask and its constants (the boolean
    causal mask, RoPE's tables, autocast's low-precision copies of its weights)."""
    t, a = seq_len, dtype_bytes(dtype)
    per = block_activation_bytes(config, seq_len, dtype)
    shared = per["norms"] // 2 + per.get("dropout masks", 0) // 2  # one of each
    tokens = batch_size * seq_len
    attention = (shared + per["attention"]) * tokens
    mlp = (shared + per["feed-forward"]) * tokens
    if config.attn_impl == "explicit":
        attention += t * t  # the boolean causal mask
    if config.pos_encoding == "rope":
        attention += 8 * t * (config.n_embd // config.n_head)  # cos / sin tables
    if a != FP32:  # autocast keeps a low-precision copy of every matmul weight
        counts = parameter_counts(config)
        attention += counts.attention_matrices * a
        mlp += counts.mlp_matrices * a
    return attention, mlp


def block_bytes(
    config: GPTConfig, batch_size: int, seq_len: int, dtype=torch.float32
) -> int:
    """Bytes one block saves for a batch: per-token activations and its constants."""
    return sum(sublayer_bytes(config, batch_size, seq_len, dtype))


def checkpointed_blocks(config: GPTConfig, activation_checkpointing: bool | int) -> int:
    if activation_checkpointing is True:
        return config.n_layer
    return int(activation_checkpointing)


def saved_parts(
    config: GPTConfig,
    batch_size: int,
    seq_len: int,
    *,
    dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool | int = False,
    checkpoint_part: str = "block",
    loss_chunk: int = 0,
) -> dict:
    """What autograd saves, by where: ``batch`` (token ids and targets, int64),
    ``embedding``, ``blocks`` (a list, block 0 first) and ``head`` (bytes)."""
    if checkpoint_part not in ("block", "attention"):
        raise ValueError(
            f"checkpoint_part must be 'block' or 'attention', got {checkpoint_part!r}"
        )
    tokens = batch_size * seq_len
    c, v, a = config.n_embd, config.vocab_size, dtype_bytes(dtype)
    attention, mlp = sublayer_bytes(config, batch_size, seq_len, dtype)
    kept = c * FP32 * tokens  # a checkpointed part keeps its fp32 input
    recomputed = kept + (mlp if checkpoint_part == "attention" else 0)
    n_ckpt = checkpointed_blocks(config, activation_checkpointing)
    blocks = [
        recomputed if i < n_ckpt else attention + mlp for i in range(config.n_layer)
    ]
    embedding = seq_len * INT64 if config.pos_encoding == "learned" else 0
    if config.dropout > 0:
        embedding += tokens * c * FP32  # the embedding dropout's mask
    if config.norm == "layernorm":
        final_norm = c * FP32 + 2 * FP32
    else:
        final_norm = 2 * c * FP32 + FP32
    if loss_chunk:  # the chunked loss keeps the fp32 hidden states, one lse per row
        head = tokens * (final_norm + c * FP32 + FP32) + INT64  # + the row count
    else:  # the head's input and the fp32 log-probabilities, + the mean's 1/N
        head = tokens * (final_norm + c * a + v * FP32) + FP32
        if a != FP32:
            head += v * c * a  # the head's weight, cast
    return dict(batch=2 * INT64 * tokens, embedding=embedding, blocks=blocks, head=head)


def estimate_activation_bytes(
    config: GPTConfig,
    batch_size: int,
    seq_len: int,
    *,
    dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool | int = False,
    checkpoint_part: str = "block",
    loss_chunk: int = 0,
) -> int:
    """Bytes autograd saves for backward in one forward pass of ``GPT(config)``.

    ``activation_checkpointing``: ``True`` (every block) or a number of blocks; a
    checkpointed block keeps only its fp32 input (``checkpoint_part="attention"``:
    its input and the feed-forward's activations). ``loss_chunk``: the chunked loss
    of ``GPT.set_chunked_loss``, which saves no log-probabilities.
    """
    parts = saved_parts(
        config,
        batch_size,
        seq_len,
        dtype=dtype,
        activation_checkpointing=activation_checkpointing,
        checkpoint_part=checkpoint_part,
        loss_chunk=loss_chunk,
    )
    return parts["batch"] + parts["embedding"] + sum(parts["blocks"]) + parts["head"]
