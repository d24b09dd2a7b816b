"""Where training memory goes, estimated from a config: the step's peak, term by
term, and a planner that fits a run into a memory budget.

A training step holds weights, gradients and AdamW's state (16 bytes per parameter
in fp32), the activations autograd saved for backward (``shared.activation_memory``)
and, at its worst moment, temporaries: at GPT-2's vocabulary the loss's N x V
gradients, later a block's gradients, the optimizer's scratch copies.
``estimate_peak_memory`` names each term at each moment that can be the peak;
``shared.memory_profile`` measures the same peak on a real step (and the timeline of
the step's allocations), and ``tests/test_memory.py`` holds the two within 10%.
The measuring functions are re-exported here, where chapter 5 imports them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from shared.activation_memory import (
    FP32,
    block_activation_bytes,
    block_bytes,
    checkpointed_blocks,
    dtype_bytes,
    estimate_activation_bytes,
    parameter_counts,
    parameter_tensors,
    saved_parts,
    sublayer_bytes,
)
from shared.memory_profile import (
    MemoryBreakdown,
    MemoryTimeline,
    SavedTensors,
    measure_peak_memory,
    measure_training_memory,
    memory_timeline,
    optimizer_state_bytes,
    peak_memory_bytes,
    resting_bytes,
    saved_tensors,
    tensor_bytes,
    training_step,
    training_timeline,
)
from shared.model import GPTConfig

__all__ = [
    "MemoryBreakdown",
    "MemoryTimeline",
    "PeakEstimate",
    "Plan",
    "SavedTensors",
    "block_activation_bytes",
    "block_bytes",
    "estimate_activation_bytes",
    "estimate_peak_memory",
    "estimate_training_memory",
    "measure_peak_memory",
    "measure_training_memory",
    "memory_timeline",
    "optimizer_state_bytes",
    "parameter_tensors",
    "peak_memory_bytes",
    "plan_training",
    "resting_bytes",
    "saved_tensors",
    "sublayer_bytes",
    "tensor_bytes",
    "training_step",
    "training_timeline",
]

# --------------------------------------------------------------------------- the peak


@dataclass
class PeakEstimate:
    """The bytes alive at each moment of a training step that can be its peak,
    term by term; the peak is the largest moment."""

    moments: dict[str, dict[str, int]]

    @property
    def moment(self) -> str:
        """The moment of the peak."""
        return max(self.moments, key=lambda m: sum(self.moments[m].values()))

    @property
    def terms(self) -> dict[str, int]:
        """The named terms of the peak."""
        return self.moments[self.moment]

    @property
    def bytes(self) -> int:
        """The peak: the sum of its terms."""
        return sum(self.terms.values())


def estimate_peak_memory(
    config: GPTConfig,
    batch_size: int,
    seq_len: int,
    *,
    dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool | int = False,
    checkpoint_part: str = "block",
    loss_chunk: int = 0,
    foreach: bool = False,
    keep_logits: bool = False,
) -> PeakEstimate:
    """The peak of one training step of ``GPT(config)`` with AdamW, from the config.

    The peak is what ``shared.memory_profile.measure_peak_memory`` measures: weights,
    AdamW's state and the batch, plus the most a step (``zero_grad`` to None,
    forward, backward, ``optimizer.step()``) allocates above them at any instant.
    Each moment that can be that instant is a dict of named terms (N = batch x
    seq_len tokens, V the vocabulary, C the width):

    * ``loss forward``: the saved activations (the fp32 log-probabilities among
      them), the logits (N x V; under autocast also their fp32 copy and the final
      norm's fp32 output) and autocast's copies of checkpointed blocks' weights
      (saved by no one, cached until autocast exits); chunked: a chunk's logits
      next to the previous chunk's, and autocast's copy of the output matrix;
    * ``loss backward``: every saved activation and the gradients of the
      log-probabilities and of the logits (N x V fp32 each), alive together in
      ``log_softmax``'s backward. Chunked: the (V, C) gradient of the output matrix
      and its product with a chunk's hidden states, a chunk's logits, their
      difference with the log-sum-exp and its exponential, the previous chunk's;
    * ``head backward``: the log-probabilities freed, the gradients of the logits,
      of the output matrix and of the hidden states in the compute dtype;
    * ``block backward`` (feed-forward, then attention; the worst block): the
      gradients so far, the activations of this block (rebuilt when checkpointed)
      and those below it, the residual stream's gradient (N x C fp32) and the
      widest gradient inside the sublayer (the hidden width, SwiGLU two of them;
      attention's output, q, k and v, explicit attention the T x T scores);
    * ``embedding backward``: every gradient; with tied weights the embedding's own
      (V, C) gradient and its sum with the output head's;
    * ``optimizer step``: every gradient and AdamW's temporaries: two copies of the
      largest parameter for the for-loop AdamW (PyTorch's default on CPU:
      ``sqrt(exp_avg_sq)`` and its division), one of the whole weight-decay group
      with ``foreach=True`` (the default on CUDA: ``_foreach_sqrt``).

    ``keep_logits``: the caller holds the logits through the step (``logits, loss =
    model(x, y)``). Within 10% of the measured peak on CPU, the moment included
    (``tests/test_memory.py``).
    """
    counts = parameter_counts(config)
    n_ckpt = checkpointed_blocks(config, activation_checkpointing)
    parts = saved_parts(
        config,
        batch_size,
        seq_len,
        dtype=dtype,
        activation_checkpointing=n_ckpt,
        checkpoint_part=checkpoint_part,
        loss_chunk=loss_chunk,
    )
    n, v, a = batch_size * seq_len, config.vocab_size, dtype_bytes(dtype)
    base = {
        "weights": counts.params * FP32 + counts.buffer_bytes,
        "AdamW state": 2 * counts.params * FP32 + counts.tensors * FP32,
        "batch": parts["batch"],
    }
    if keep_logits and not loss_chunk:
        base["logits kept by the caller"] = n * v * a
    saved = parts["embedding"] + sum(parts["blocks"]) + parts["head"]
    copies = 0  # autocast's copies of checkpointed weights: saved by no one, but
    if a != FP32:  # cached until autocast exits, at the end of the forward pass
        per_block = counts.attention_matrices
        per_block += counts.mlp_matrices if checkpoint_part == "block" else 0
        copies = n_ckpt * per_block * a
    moments = {}
    loss = _loss_moments(config, n, dtype, loss_chunk, keep_logits, saved, copies)
    for name, alive, temporaries in loss:
        moments[name] = {**base, "saved activations": alive, **temporaries}
    blocks = _block_moments(
        config, batch_size, seq_len, dtype, parts, n_ckpt, checkpoint_part
    )
    for name, terms in blocks:
        moments[name] = {**base, **terms}
    gradients = counts.params * FP32
    tied = 2 * counts.head * FP32 if config.tie_weights else 0
    moments["embedding backward"] = {
        **base,
        "gradients": gradients,
        "embedding gradients": tied,
    }
    if foreach:  # one temporary per parameter of the largest group, all at once
        temps = max(counts.matrices, counts.params - counts.matrices) * FP32
    else:  # sqrt(exp_avg_sq) / bias correction, one parameter at a time
        temps = 2 * counts.largest * FP32
    moments["optimizer step"] = {
        **base,
        "gradients": gradients,
        "optimizer temporaries": temps,
    }
    return PeakEstimate(moments)


def _loss_moments(
    config: GPTConfig,
    n: int,
    dtype: torch.dtype,
    loss_chunk: int,
    keep_logits: bool,
    saved: int,
    copies: int,
) -> Iterator[tuple[str, int, dict[str, int]]]:
    """(moment, saved activations alive, temporaries) around the loss, N tokens."""
    counts = parameter_counts(config)
    v, c, a = config.vocab_size, config.n_embd, dtype_bytes(dtype)
    low = a != FP32  # autocast: matmuls in bf16, the loss in fp32
    if not loss_chunk:
        log_probs = n * v * FP32
        logits = 0 if keep_logits else n * v * a  # (already in the base if kept)
        forward = logits
        if low:  # the logits' fp32 copy; the final norm's fp32 output (saved in fp32
            forward += n * v * FP32 + n * c * FP32  # as the head's input, bf16 here)
        yield (
            "loss forward",
            saved,
            {"autocast weight copies": copies, "loss temporaries": forward},
        )
        yield "loss backward", saved, {"loss temporaries": 2 * log_probs}
        matmul = (n * v + counts.head + n * c) * a  # grads of logits, W, hidden
        cast = n * v * (a + FP32) if low else 0  # the fp32 and bf16 grads of logits
        yield (
            "head backward",
            saved - log_probs,
            {"loss temporaries": max(matmul, cast)},
        )
        return
    rows = min(loss_chunk, n)
    full, last = divmod(n, rows)  # full chunks, and the rows of a shorter last one
    chunk = v * FP32  # one row of fp32 logits
    # forward: the previous chunk's logits stay alive until this chunk's are made;
    # autocast casts the output matrix for each chunk's bf16 matmul, then the fp32
    # copy of its output follows (fp32: logits, then logsumexp's x - max)
    previous = rows * chunk if n > rows else 0
    if low:
        forward = previous + rows * v * a + max(counts.head * a, rows * chunk)
    else:
        forward = max(previous, rows * chunk) + rows * chunk
    yield (
        "loss forward",
        saved,
        {"autocast weight copies": copies, "loss temporaries": forward},
    )
    # backward: a chunk's logits and their difference with the log-sum-exp, then its
    # exponential (the gradient), next to the previous chunk's gradient
    pairs = [2 * rows] + [3 * rows] * (full >= 2) + [rows + 2 * last] * (last > 0)
    backward = n * c * FP32 + counts.head * FP32  # grads of hidden and of the weight
    backward += max(max(pairs) * chunk, rows * chunk + counts.head * FP32)
    yield "loss backward", saved, {"loss temporaries": backward}


def _block_moments(
    config: GPTConfig,
    batch_size: int,
    seq_len: int,
    dtype: torch.dtype,
    parts: dict,
    n_ckpt: int,
    checkpoint_part: str,
) -> Iterable[tuple[str, dict[str, int]]]:
    """(moment, terms) of the worst block's backward, feed-forward then attention;
    the first ``n_ckpt`` blocks are checkpointed."""
    counts = parameter_counts(config)
    n, c, a = batch_size * seq_len, config.n_embd, dtype_bytes(dtype)
    attention, mlp = sublayer_bytes(config, batch_size, seq_len, dtype)
    residual = n * c * FP32  # the gradient flowing down the residual stream
    width = config.hidden_size * (2 if config.ffn == "swiglu" else 1)
    widest = {  # the largest gradient inside each sublayer's backward
        "feed-forward": n * width * a,
        "attention": 4 * n * c * a,  # of the output, q, k and v
    }
    if config.attn_impl == "explicit":  # the scores' and the weights' gradients
        widest["attention"] += 2 * batch_size * config.n_head * seq_len**2 * a
    grads = (counts.head + counts.final_norm) * FP32
    below = parts["embedding"] + sum(parts["blocks"])
    worst: dict[str, dict[str, int]] = {}
    for i in reversed(range(config.n_layer)):  # backward runs from the top block
        below -= parts["blocks"][i]
        kept = parts["blocks"][i]
        if i >= n_ckpt:  # plain: the feed-forward's activations go first
            alive = {"feed-forward": (kept, 0), "attention": (attention, 0)}
        elif checkpoint_part == "block":  # the whole block rebuilt
            alive = {
                "feed-forward": (kept, attention + mlp),
                "attention": (kept, attention),
            }
        else:  # the attention rebuilt once the feed-forward is done
            alive = {"feed-forward": (kept, 0), "attention": (kept - mlp, attention)}
        done = {"feed-forward": counts.mlp_matrices, "attention": counts.block}
        for part, (saved, rebuilt) in alive.items():
            terms = {
                "gradients": grads + done[part] * FP32,
                "saved activations": below + saved,
                "recompute": rebuilt,
                "block transient": residual + widest[part],
            }
            key = f"block backward ({part})"
            if sum(terms.values()) > sum(worst.get(key, {}).values()):
                worst[key] = terms
        grads += counts.block * FP32
    return worst.items()


def estimate_training_memory(
    config: GPTConfig,
    batch_size: int,
    seq_len: int,
    *,
    dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool | int = False,
    checkpoint_part: str = "block",
    loss_chunk: int = 0,
    foreach: bool = False,
    keep_logits: bool = False,
) -> dict[str, int]:
    """Bytes of ``params``, ``grads``, ``optimizer`` (AdamW), ``activations`` and
    ``recompute`` of one training step of ``GPT(config)``, their ``total``, and the
    step's ``peak`` (:func:`estimate_peak_memory`, which says what it holds).

    Weights, gradients and AdamW's two moments are fp32 (with ``dtype=bfloat16`` the
    forward pass runs under autocast: mixed precision with fp32 master weights), so
    they take 4 + 4 + 8 = 16 bytes per parameter. ``activations`` is what autograd
    saves in the forward pass (:func:`estimate_activation_bytes`); with activation
    checkpointing, the backward pass rebuilds one block's activations at a time, and
    ``recompute`` counts that block. ``total`` adds these five, but they are never
    all alive at once, and temporaries come on top: the ``peak`` is what a device
    must hold (the other options are :func:`estimate_peak_memory`'s).
    """
    n_params, n_tensors = parameter_tensors(config)
    kw = dict(
        dtype=dtype,
        activation_checkpointing=activation_checkpointing,
        checkpoint_part=checkpoint_part,
        loss_chunk=loss_chunk,
    )
    attention, mlp = sublayer_bytes(config, batch_size, seq_len, dtype)
    recompute = attention if checkpoint_part == "attention" else attention + mlp
    out = {
        "params": n_params * FP32,
        "grads": n_params * FP32,
        "optimizer": 2 * n_params * FP32 + n_tensors * FP32,  # moments + step counts
        "activations": estimate_activation_bytes(config, batch_size, seq_len, **kw),
        "recompute": recompute if activation_checkpointing else 0,
    }
    out["total"] = sum(out.values())
    peak = estimate_peak_memory(
        config, batch_size, seq_len, foreach=foreach, keep_logits=keep_logits, **kw
    )
    out["peak"] = peak.bytes
    return out


# ---------------------------------------------------------------------------- planner


@dataclass
class Plan:
    """How to train ``config`` within a memory budget: the settings and their bytes
    (``memory`` as :func:`estimate_training_memory` returns it)."""

    micro_batch: int
    grad_accum_steps: int
    activation_checkpointing: bool
    dtype: torch.dtype
    memory: dict[str, int]
    loss_chunk: int = 0

    def __str__(self) -> str:
        ckpt = "checkpointing" if self.activation_checkpointing else "no checkpointing"
        loss = f", chunked loss ({self.loss_chunk} rows)" if self.loss_chunk else ""
        return (
            f"micro-batch {self.micro_batch} x {self.grad_accum_steps} accumulation "
            f"steps, {ckpt}{loss}, {str(self.dtype).removeprefix('torch.')}: "
            f"peak {self.memory['peak'] / 2**30:.2f} GiB"
        )


def plan_training(
    config: GPTConfig,
    budget_bytes: int,
    *,
    seq_len: int,
    global_batch: int,
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16),
    loss_chunk: int = 0,
    foreach: bool = False,
) -> Plan | None:
    """The fastest setting whose estimated peak fits ``budget_bytes``, or None.

    Options are tried from cheapest in time to dearest: precisions in the order of
    ``dtypes`` (put bfloat16 first on hardware where it is faster), then without and
    with activation checkpointing (about one more forward pass), then micro-batches
    from ``global_batch`` down to 1 (only divisors, so that accumulation gives the
    same update as the full batch). The peak (:func:`estimate_peak_memory`) is what
    must fit; ``loss_chunk`` and ``foreach`` are passed to it (``foreach=True`` for
    CUDA's default AdamW). Weights, gradients and AdamW's state do not shrink with
    any of these: when they alone exceed the budget, nothing fits on one device
    (chapter 6 shards them).
    """
    micro_batches = [b for b in range(global_batch, 0, -1) if global_batch % b == 0]
    for dtype in dtypes:
        for ckpt in (False, True):
            for micro in micro_batches:
                memory = estimate_training_memory(
                    config,
                    micro,
                    seq_len,
                    dtype=dtype,
                    activation_checkpointing=ckpt,
                    loss_chunk=loss_chunk,
                    foreach=foreach,
                )
                if memory["peak"] <= budget_bytes:
                    steps = global_batch // micro
                    return Plan(micro, steps, ckpt, dtype, memory, loss_chunk)
    return None
